"""Run msModelSlim's CLI with an optional workaround, INSIDE the msModelSlim venv.

    <msms-venv>/bin/python launch_msmodelslim.py [--patch-rmsnorm] quant --model_type ... --config_path ...

``--patch-rmsnorm`` works around the bf16 dtype bug of modelslim-tool.md §1.6: msModelSlim's replacement RMSNorm
(``msmodelslim/ir/rms_norm.py``) always returns float32, so on a bf16 model the next linear gets a float32
activation and ``iter_smooth`` dies with "expected m1 and m2 to have the same dtype". The patch casts the norm's
output back to the dtype of its input; everything else is the CLI's own ``main``, with the remaining arguments.
"""

import sys


def patch_rmsnorm() -> None:
    from msmodelslim.ir.rms_norm import RMSNorm

    forward = RMSNorm.forward

    def forward_in_input_dtype(self, hidden_states):
        return forward(self, hidden_states).to(hidden_states.dtype)

    RMSNorm.forward = forward_in_input_dtype


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--patch-rmsnorm":
        patch_rmsnorm()
        argv = argv[1:]
    from msmodelslim.cli.__main__ import main as cli_main

    sys.argv = ["msmodelslim", *argv]
    result = cli_main()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
