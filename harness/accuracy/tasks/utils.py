"""Dataset loaders for the local lm-eval tasks (`custom_dataset: !function utils.<name>`).

lm-eval resolves `!function` against this file's directory and calls the loader as
`loader(**metadata, **dataset_kwargs)`; each returns a `DatasetDict` with a `test` split read from the committed
`harness/data/*.jsonl`, so the tasks run offline and from any working directory.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parents[2] / "data"


def _local(name: str) -> datasets.DatasetDict:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(x) for x in lines if x.strip()])})


def wiki_ppl(**_) -> datasets.DatasetDict:
    return _local("wiki_ppl.jsonl")


def owt_ppl(**_) -> datasets.DatasetDict:
    return _local("owt_ppl.jsonl")


def siqa(**_) -> datasets.DatasetDict:
    return _local("siqa.jsonl")


def wiki_order(**_) -> datasets.DatasetDict:
    return _local("wiki_order.jsonl")
