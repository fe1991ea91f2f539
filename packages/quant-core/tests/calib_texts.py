"""The calibration text of the quantizer tests (smoothing, head), and its file."""

from pathlib import Path

TEXTS = [
    "The capital of France is Paris, and the Seine flows through it.",
    "def add(a, b):  return a + b  # small code sample",
    "Numbers 3.14159 and 2.71828 appear in many formulas.",
    "Question: There are 15 trees in the grove. How many did they plant?",
]


def write_calib(directory: Path) -> Path:
    """``TEXTS`` as a calibration file (one sample per line) in ``directory``."""
    path = directory / "calib.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path
