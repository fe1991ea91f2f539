"""Regenerate ``docs/reliability.md`` from the bad-input case table.

    python harness/reliability_table.py          # rewrite docs/reliability.md
    python harness/reliability_table.py --check  # exit 1 when it is stale (what the pytest suite also checks)

Runs every case of ``packages/quant-core/tests/reliability/cases.py`` (tiny models, CPU, about half a minute) in a
temporary directory and renders the table with ``reliability.table.render``. Needs quant-core with its ``hf`` extra.
"""

import argparse
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "packages" / "quant-core" / "tests"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the file is up to date")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(TESTS))
    import torch
    from reliability.cases import Workspace
    from reliability.table import DOC, render

    torch.set_num_threads(1)  # as the test suite runs (tests/conftest.py)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        text = render(Workspace(Path(tmp)))
    current = DOC.read_text(encoding="utf-8") if DOC.is_file() else None
    if args.check:
        print(f"{DOC}: {'up to date' if current == text else 'STALE'}")
        return 0 if current == text else 1
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC} ({'unchanged' if current == text else 'updated'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
