"""Write a dataset of another layout as the file sdpg.py reads: one JSON object per line, {question, answer, solution}.

    python data/prepare.py open-r1/DAPO-Math-17k-Processed dapo-en.jsonl --config en
    python data/prepare.py my_math.parquet my_math.jsonl --question-field extra_info.problem --answer-field answer
    python sdpg.py --dataset dapo-en.jsonl --eval-n 200

SOURCE is a Hub dataset id (--config, --split) or a local .jsonl/.json/.parquet file. The layouts of GSM8K, MATH and
NuminaMath (a worked solution with a \\boxed{} answer is split into answer and solution), MATH-500 and others
(problem, answer, solution) and DAPO-Math-17k (chat messages, the gold in reward_model.ground_truth, no worked
solution) are recognised; otherwise --question-field, --answer-field and --solution-field name the fields (a dotted
path such as extra_info.problem reaches inside a record; a list of chat messages gives its last user message).
A Hub dataset with a test split is written train split first, then the first --eval-n test rows, which sdpg.py
holds out with the same --eval-n; any other source keeps its order (sdpg.py holds out its last --eval-n rows).
"""

import argparse
import json
import os
import re
import sys
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from verifiers import extract_answer, gsm8k_gold  # noqa: E402


class Fields(NamedTuple):
    """Where a dataset row keeps each part of an example: dotted paths, '' for none."""
    question: str
    answer: str
    solution: str


def dataset_fields(row: dict, question: str | None, answer: str | None, solution: str | None, where: str) -> Fields:
    """The field paths given on the command line; the others from the layout of a known dataset:

        DAPO-Math-17k          prompt (chat messages or text), reward_model.ground_truth; no worked solution
        GSM8K                  question, answer ("<worked solution> #### 72")
        MATH-500 and others    problem, answer, solution
        MATH, NuminaMath       problem, solution (a worked solution with a \\boxed{} answer)
    """
    if "prompt" in row and isinstance(row.get("reward_model"), dict):
        auto = Fields("prompt", "reward_model.ground_truth", "")
    else:
        auto_answer = next((k for k in ("answer", "solution") if k in row), "answer")
        auto = Fields(next((k for k in ("question", "problem") if k in row), ""), auto_answer,
                      "solution" if auto_answer == "answer" and "solution" in row else "")
    fields = Fields(question or auto.question, answer or auto.answer, auto.solution if solution is None else solution)
    if not fields.question:
        raise SystemExit(f"error: {where} matches no known layout (its fields: {', '.join(map(str, row))}); "
                         f"name them with --question-field and --answer-field")
    return fields


def field_value(row: dict, path: str):
    """row['a']['b'] for the path 'a.b'; None when a part is missing."""
    value = row
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def as_text(value) -> str | None:
    """A field's value as text: a number as written, a list of chat messages as its last user message."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = ([m for m in value if m.get("role") == "user"] or value)[-1].get("content")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        return None
    return str(value)


def split_gold(gold: str) -> tuple[str, str]:
    r"""A gold field -> (answer, worked solution). GSM8K's "<solution> #### 72" gives its solution without the
    calculator notes such as <<48/2=24>>; a worked solution with a \boxed{} answer (MATH, NuminaMath) is kept
    whole; anything else is the answer itself, with no solution.
    >>> split_gold("Half of 8 is $\\boxed{4}$.")
    ('4', 'Half of 8 is $\\boxed{4}$.')
    """
    if "####" in gold:
        return gsm8k_gold(gold), re.sub(r"<<[^>]*>>", "", gold.rsplit("####", 1)[0]).strip()
    if "\\boxed" in gold or "\\fbox" in gold:
        return extract_answer(gold) or "", gold
    return gold, ""


def normalise_row(row: dict, where: str, fields: Fields | None = None) -> dict:
    """A dataset row -> {question, answer, solution}; `fields` defaults to the row's own layout."""
    fields = fields or dataset_fields(row, None, None, None, where)
    question, gold = as_text(field_value(row, fields.question)), as_text(field_value(row, fields.answer))
    for path, value in ((fields.question, question), (fields.answer, gold)):
        if value is None:
            raise SystemExit(f"error: {where} has no '{path}' field (its fields: {', '.join(map(str, row))}; name "
                             f"the right ones with --question-field and --answer-field)")
    answer, solution = split_gold(gold)
    if answer.strip() == "":
        raise SystemExit(f"error: {where}: no final answer found in its '{fields.answer}' field")
    given = as_text(field_value(row, fields.solution)) if fields.solution else None
    return {"question": question, "answer": answer, "solution": given or solution}


def read_rows(source: str, config: str | None, split: str | None, eval_n: int) -> tuple[list[dict], int]:
    """(the source's rows in the order to write, how many at the end are held out: 0 if the source has no test
    split, then sdpg.py holds out the last --eval-n whatever they are)."""
    import datasets

    if source.endswith((".jsonl", ".json", ".parquet")):
        if not os.path.isfile(source):
            raise SystemExit(f"error: no such file: {source}")
        try:
            return list(datasets.load_dataset("parquet" if source.endswith(".parquet") else "json",
                                              data_files=source, split="train")), 0
        except Exception as e:  # datasets raises many types for a malformed file
            raise SystemExit(f"error: could not read {source}: {str(e).strip().splitlines()[0]}")
    try:
        splits = datasets.load_dataset(source, config)
    except Exception as e:
        raise SystemExit(f"error: could not load dataset '{source}': {str(e).strip().splitlines()[0]}")
    if split:
        if split not in splits:
            raise SystemExit(f"error: '{source}' has no split '{split}' (its splits: {', '.join(splits)})")
        return list(splits[split]), 0
    if "train" not in splits:
        raise SystemExit(f"error: '{source}' has no train split (its splits: {', '.join(splits)}); give --split")
    if "test" not in splits:
        return list(splits["train"]), 0
    test = list(splits["test"])[:eval_n]
    return list(splits["train"]) + test, len(test)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a Hub dataset id or a local .jsonl/.json/.parquet file")
    p.add_argument("out", help="the .jsonl file to write")
    p.add_argument("--config", help="the Hub dataset's configuration (GSM8K: main; DAPO-Math-17k-Processed: en)")
    p.add_argument("--split", help="write only this split of a Hub dataset, in its order")
    p.add_argument("--eval-n", type=int, default=200, help="test rows to put at the end (a Hub dataset's test split)")
    p.add_argument("--question-field", help="field holding the question [auto: from the layout]")
    p.add_argument("--answer-field", help="field holding the gold answer, or a worked solution that ends in it")
    p.add_argument("--solution-field", help="field holding a worked solution ('' for none) [auto: from the layout]")
    args = p.parse_args(argv)
    rows, held_out = read_rows(args.source, args.config, args.split, args.eval_n)
    if not rows:
        raise SystemExit(f"error: {args.source} has no rows")
    fields = dataset_fields(rows[0], args.question_field, args.answer_field, args.solution_field, args.source)
    examples = [normalise_row(row, f"{args.source} row {i}", fields) for i, row in enumerate(rows)]
    with open(args.out, "w") as f:
        f.writelines(json.dumps(ex) + "\n" for ex in examples)
    print(f"wrote {len(examples)} rows to {args.out}" + (f", the last {held_out} from the test split: train with "
                                                          f"--eval-n {held_out}" if held_out else ""))


if __name__ == "__main__":
    main()
