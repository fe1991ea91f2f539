"""Rebuild the evaluation files in this directory from the PyPI `evals` wheel (never installed, only unzipped).

    pip download --no-deps evals==3.0.1.post1 -d w
    unzip -o w/evals-3.0.1.post1-py3-none-any.whl 'evals/registry/data/schelling_point/*' \
        'evals/registry/data/theory_of_mind/socialiqa/test.jsonl' -d evx
    python harness/data/derive.py evx/evals/registry/data

Wikipedia rows 0-399 are perplexity text, rows 500-755 calibration text: the two never overlap.
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
SIQA_ITEM = re.compile(r"^(.*?)\s*A: (.*?); B: (.*?); C: (.*?)\.?$", re.DOTALL)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(name: str, items: list[dict]) -> None:
    with (HERE / name).open("w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{name}: {len(items)} items")


def docs(paragraphs: list[str], per_doc: int) -> list[dict]:
    return [{"text": "\n\n".join(paragraphs[i : i + per_doc])} for i in range(0, len(paragraphs), per_doc)]


def main(data: Path) -> None:
    wiki = [row["0"] for row in rows(data / "schelling_point" / "wikipedia_5.jsonl")]
    owt = [row["0"] for row in rows(data / "schelling_point" / "owt_5.jsonl")]
    write("wiki_ppl.jsonl", docs(wiki[:400], 10))
    write("owt_ppl.jsonl", docs(owt[:200], 10))
    write("calib_wiki.jsonl", [{"text": p} for p in wiki[500:756]])
    order = []
    for i, row in enumerate(rows(data / "schelling_point" / "wikipedia_5.jsonl")[:500]):
        choices = [row["0"], row["1"]] if i % 2 == 0 else [row["1"], row["0"]]
        order.append({"choices": choices, "label": i % 2})
    write("wiki_order.jsonl", order)
    siqa = []
    for row in rows(data / "theory_of_mind" / "socialiqa" / "test.jsonl"):
        match = SIQA_ITEM.match(row["input"][-1]["content"].strip())
        if match is None:
            raise SystemExit(f"unparsed SocialIQA item: {row}")
        question, *choices = (part.strip() for part in match.groups())
        siqa.append({"question": question, "choices": choices, "label": "ABC".index(row["ideal"])})
    write("siqa.jsonl", siqa)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
