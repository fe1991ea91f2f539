"""The ``vllm.general_plugins`` entry point: registers the config in every vLLM process."""

import logging

logger = logging.getLogger(__name__)


def register() -> None:
    """Register ``AscendModelSlimConfig`` as ``"modelslim"`` and, unless another package owns it, ``"ascend"``."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from vllm_adapter.config import AscendModelSlimConfig, ModelSlimAliasConfig

    if "modelslim" not in QUANTIZATION_METHODS:
        register_quantization_config("modelslim")(ModelSlimAliasConfig)
    if "ascend" not in QUANTIZATION_METHODS:
        register_quantization_config("ascend")(AscendModelSlimConfig)
    else:
        from vllm.model_executor.layers.quantization import get_quantization_config

        owner = get_quantization_config("ascend")
        if owner is not AscendModelSlimConfig:  # e.g. vllm-ascend: it also does its own checkpoint detection
            logger.warning(
                "quantization 'ascend' is already served by %s.%s; vllm-adapter is available as "
                "--quantization modelslim.", owner.__module__, owner.__qualname__,
            )  # fmt: skip
            return
    detect_modelslim_checkpoints("ascend")


def detect_modelslim_checkpoints(method: str) -> None:
    """Make vLLM pick ``method`` for a local ModelSlim checkpoint loaded without ``--quantization``.

    msModelSlim strips ``quantization_config`` from config.json, so vLLM would otherwise build float layers and fail
    on the first quantized tensor with a bare ``KeyError`` (e.g. ``...deq_scale``). The description file is the
    marker upstream vllm-ascend detects too; we hook vLLM's quantization check, which runs after plugins load.
    """
    from vllm.config.model import ModelConfig

    from quant_core import is_modelslim_checkpoint

    original = ModelConfig._verify_quantization
    if getattr(original, "modelslim_detection", False):
        return

    def verify_quantization(self) -> None:
        if self.quantization is None and is_modelslim_checkpoint(self.model):
            logger.info("%s is a ModelSlim checkpoint: serving it with quantization=%r", self.model, method)
            self.quantization = method
        original(self)

    verify_quantization.modelslim_detection = True
    ModelConfig._verify_quantization = verify_quantization
