"""The quantizer SIGKILLed at many points leaves the output directory as it was (or absent), or, once the final swap
happened, complete and new; never a checkpoint that loads partially.

``kill_driver.py`` (one subprocess: torch imported once) forks a child per run that stops at a deterministic point of
the write (after a shard, half-way through a JSON file, around the final swap, ...) and waits; this test SIGKILLs it
by pid and inspects the directory. A few runs are killed after a delay instead of at a hook.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from quant_core.errors import QuantCoreError
from quant_core.quantize import quantize_model
from quant_core.runtime import load_quantized
from quant_core.tiny_models import make_tiny_model

DRIVER = Path(__file__).with_name("kill_driver.py")
SHARD_BYTES = 60_000  # about ten shards for the tiny model: kills between shards are possible
TIMEOUT = 120.0
# Points before the new directory is in place (out_dir must be untouched), and after (it must be complete and new).
BEFORE = ["flush-1", "flush-3", "rename-shard-1", "rename-shard-3", "half-index", "half-description", "half-config",
          "side-files", "before-swap"]  # fmt: skip
AFTER = ["after-swap"]
DELAYS = {"none-0.0": 0.0, "none-0.1": 0.1, "none-0.3": 0.3}  # killed after a delay, wherever it is
RUNS = [(p, True) for p in BEFORE + AFTER + list(DELAYS)] + [
    (p, False) for p in ("flush-1", "half-description", "before-swap", "after-swap", "none-0.1")
]


class Driver:
    """The kill driver subprocess, read line by line with a timeout (a hung child fails the test, not CI)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(DRIVER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buffer = b""
        self.live: set[int] = set()
        self.expect("ready")

    def message(self) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"kill driver silent for {TIMEOUT} s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise EOFError("kill driver exited")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def expect(self, key: str) -> dict:
        while True:
            message = self.message()
            if "error" in message:
                raise AssertionError(f"quantizer failed in the child:\n{message['error']}")
            if key in message:
                return message

    def start(self, **command) -> int:
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        pid = self.expect("started")["started"]
        self.live.add(pid)
        return pid

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.live.discard(pid)
        while self.expect("exit")["exit"] != pid:
            pass

    def close(self) -> None:
        for pid in self.live:  # only children this test started, by pid
            os.kill(pid, signal.SIGKILL)
        self.proc.stdin.close()
        self.proc.wait(timeout=TIMEOUT)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    source = make_tiny_model("qwen3", root / "src")
    old = quantize_model(source, root / "old", "W8A16", max_shard_bytes=SHARD_BYTES, progress=False).out_dir
    new = quantize_model(source, root / "new", "W8A8_DYNAMIC", max_shard_bytes=SHARD_BYTES, progress=False).out_dir
    assert len(list(new.glob("*.safetensors"))) >= 5
    return root, source, tree(old), tree(new), old


@pytest.fixture(scope="module")
def driver(setup):
    d = Driver()
    yield d
    d.close()


def check_leftover(path: Path, complete: list[dict]) -> None:
    """A directory a killed run left next to out_dir: complete (one of the known versions) or refused by the loader."""
    if tree(path) in complete:
        return
    with pytest.raises(QuantCoreError):
        load_quantized(path, backend="reference")


@pytest.mark.parametrize(("point", "existing"), RUNS, ids=[f"{p}-{'overwrite' if e else 'new'}" for p, e in RUNS])
def test_sigkill_leaves_old_or_new_never_partial(point, existing, setup, driver, tmp_path):
    _, source, old, new, old_dir = setup
    out = tmp_path / "out"
    if existing:
        shutil.copytree(old_dir, out)
    pid = driver.start(source=str(source), out=str(out), scheme="W8A8_DYNAMIC", overwrite=existing,
                       max_shard_bytes=SHARD_BYTES, point="none" if point in DELAYS else point)  # fmt: skip
    if point in DELAYS:
        time.sleep(DELAYS[point])
    else:
        assert driver.expect("at")["at"] == point, "the run did not reach its kill point"
    driver.kill(pid)

    state = tree(out) if out.exists() else None
    before = old if existing else None
    if point in BEFORE:
        assert state == before, "out_dir changed although the kill came before the final swap"
    elif point in AFTER:
        assert state == new, "after the swap out_dir must be the complete new checkpoint"
    else:
        assert state in (before, new), "out_dir is neither the previous content nor the complete new checkpoint"
    if state is not None:
        load_quantized(out, backend="reference")  # whichever version it is, it loads
    for leftover in tmp_path.iterdir():
        if leftover != out:
            assert leftover.name.startswith(".out."), leftover  # only our hidden temporary directories
            check_leftover(leftover, [old, new])


def test_without_atomic_exchange_the_old_content_survives_aside(setup, driver, tmp_path, monkeypatch):
    # Where renameat2(RENAME_EXCHANGE) is unavailable, a kill between the two renames leaves out_dir missing and the
    # previous content intact in .out.old-*/content (documented in writer.atomic_output_dir).
    _, source, old, new, old_dir = setup
    out = tmp_path / "out"
    shutil.copytree(old_dir, out)
    pid = driver.start(source=str(source), out=str(out), scheme="W8A8_DYNAMIC", overwrite=True,
                       max_shard_bytes=SHARD_BYTES, point="fallback-between-renames")  # fmt: skip
    assert driver.expect("at")["at"] == "fallback-between-renames"
    driver.kill(pid)
    assert not out.exists()
    aside = [p / "content" for p in tmp_path.glob(".out.old-*")]
    assert len(aside) == 1 and tree(aside[0]) == old
    for leftover in tmp_path.glob(".out.tmp-*"):
        check_leftover(leftover, [old, new])


def test_an_unfinished_output_is_refused_by_name(setup, tmp_path):
    from quant_core.checkpoint import INCOMPLETE_MARKER

    old_dir = setup[-1]
    leftover = shutil.copytree(old_dir, tmp_path / ".out.tmp-abc")
    (leftover / INCOMPLETE_MARKER).touch()
    with pytest.raises(QuantCoreError, match="interrupted") as info:
        load_quantized(leftover, backend="reference")
    assert str(leftover) in str(info.value)
