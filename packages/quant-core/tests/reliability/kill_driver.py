"""Runs ``quantize_model`` in forked children that stop at a chosen point and wait there to be SIGKILLed.

Used by ``test_interrupted_writes.py``; torch and quant-core are imported once here, each run is a ``fork`` (cheap).
Protocol, one JSON object per line. The test writes ``{"source", "out", "scheme", "overwrite", "max_shard_bytes",
"point"}``. The child prints ``{"started": pid}``, then ``{"at": point, "pid": pid}`` when it reaches ``point`` (or
``{"finished": pid}`` / ``{"error": ...}``) and sleeps until killed; it never exits on its own, so the test always
kills a live process it started. The driver prints ``{"exit": pid, "signal": n}`` once the child is reaped.

Points: ``flush-N`` (after the N-th shard file is written), ``rename-shard-N`` (before the N-th shard gets its final
name), ``half-index`` / ``half-description`` / ``half-config`` (that JSON file half written), ``side-files`` (after
the first side file was copied), ``before-swap`` / ``after-swap`` (around the step that puts the new directory in
place), ``fallback-between-renames`` (no atomic exchange available: between renaming the old directory aside and the
new one in), ``none`` (no hook: the test kills after a delay).
"""

import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import quant_core.quantize.writer as writer
from quant_core.description import DESCRIPTION_FILE
from quant_core.quantize import quantize_model


def say(**message) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())  # one write: lines from the driver and its children never mix


def stop(point: str) -> None:
    say(at=point, pid=os.getpid())
    while True:
        time.sleep(3600)


def counting(n: int):
    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    return hit


def install(point: str, out: Path) -> None:
    name, _, arg = point.rpartition("-") if point[-1].isdigit() else (point, "", "")
    real_replace, real_exchange = os.replace, writer.exchange_paths
    is_tmp = lambda path: Path(path).name.startswith(f".{out.name}.tmp-")  # noqa: E731
    if name == "flush":
        hit, real_flush = counting(int(arg)), writer.ShardWriter._flush

        def flush(self) -> None:
            real_flush(self)
            if hit():
                stop(point)

        writer.ShardWriter._flush = flush
    elif name == "rename-shard":
        hit = counting(int(arg))

        def replace(src, dst) -> None:
            if Path(src).name.startswith(".shard-") and hit():
                stop(point)
            real_replace(src, dst)

        os.replace = replace
    elif name.startswith("half-"):
        target = {"half-index": writer.INDEX_FILE, "half-description": DESCRIPTION_FILE, "half-config": "config.json"}
        real_write = writer.write_json

        def write_json(path: Path, data: dict) -> None:
            if path.name == target[name]:
                raw = json.dumps(data, indent=2).encode()
                path.write_bytes(raw[: len(raw) // 2])
                stop(point)
            real_write(path, data)

        writer.write_json = write_json
    elif name == "side-files":
        real_copy = shutil.copy2

        def copy2(src, dst, **kwargs):
            result = real_copy(src, dst, **kwargs)
            stop(point)
            return result

        writer.shutil.copy2 = copy2
    elif name in ("before-swap", "after-swap"):
        before = name == "before-swap"

        def exchange(a, b) -> bool:
            if before:
                stop(point)
            done = real_exchange(a, b)
            stop(point)
            return done

        def replace(src, dst) -> None:
            if is_tmp(src) and before:
                stop(point)
            real_replace(src, dst)
            if is_tmp(src):
                stop(point)

        writer.exchange_paths, os.replace = exchange, replace
    elif name == "fallback-between-renames":

        def replace(src, dst) -> None:
            real_replace(src, dst)
            if Path(src) == out:
                stop(point)

        writer.exchange_paths, os.replace = (lambda a, b: False), replace
    elif name != "none":
        raise ValueError(f"unknown point {point!r}")


def child(command: dict) -> None:
    say(started=os.getpid())
    try:
        out = Path(command["out"]).absolute()
        install(command["point"], out)
        quantize_model(command["source"], out, command["scheme"], overwrite=command["overwrite"],
                       max_shard_bytes=command["max_shard_bytes"], progress=False)  # fmt: skip
        say(finished=os.getpid())
    except BaseException:
        say(error=traceback.format_exc(), pid=os.getpid())
    while True:
        time.sleep(3600)


def main() -> None:
    say(ready=True)
    for line in sys.stdin:
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(command)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        say(exit=pid, signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)


if __name__ == "__main__":
    main()
