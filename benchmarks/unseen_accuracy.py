"""Held-out accuracy of finished compare.py runs, also counted on only the held-out questions that a
run never met in training.

prepare_smollm2.py's small number ranges make questions repeat, so a run can train on a question
that is also among the held-out ones. For every finished run under OUT/VARIANT/seedS/ this redoes the
final greedy evaluation with sdpg.py's own functions (it must reproduce the logged final accuracy,
which is checked) and reports the accuracy without the questions the run met in training.

    python benchmarks/unseen_accuracy.py runs/compare
"""

import argparse
import glob
import json
import os
import random
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sdpg  # noqa: E402
import torch  # noqa: E402


def questions_met(train: list[dict], args: sdpg.Args) -> set[str]:
    """The training questions of a run: sdpg.main's data order, replayed from its seed."""
    order, queue, met = random.Random(args.seed), [], set()
    for _ in range(args.steps):
        batch, queue = sdpg.next_batch(queue, order, len(train), args.batch_prompts)
        met.update(train[i]["question"] for i in batch)
    return met


def recheck(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        args = sdpg.Args(**json.load(f))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        logged = [row["eval_accuracy"] for row in map(json.loads, f) if "eval_accuracy" in row][-1]
    train, held_out = sdpg.load_examples(args.dataset, args.eval_n, args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # as sdpg.main
    model, tokenizer = sdpg.load_model(os.path.join(run_dir, "final"), args.seed)
    stop_ids = sdpg.stop_token_ids(model, tokenizer)  # final/ keeps the run's generation config
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    sampler = sdpg.make_sampler(model.to(device), bf16)  # evaluated as in the run: the sampler copy
    correct = sdpg.evaluate(sampler, tokenizer, stop_ids, held_out, args)
    met = questions_met(train, args)
    unseen = [c for c, ex in zip(correct, held_out) if ex["question"] not in met]
    return {"logged": logged, "recomputed": statistics.mean(correct), "n_seen": len(correct) - len(unseen),
            "unseen": statistics.mean(unseen) if unseen else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="compare.py's --out folder")
    out = p.parse_args().out
    runs = sorted(os.path.dirname(d) for d in glob.glob(os.path.join(out, "*", "seed*", "final")))
    if not runs:
        raise SystemExit(f"error: no finished runs (VARIANT/seedS/final) under {out}")
    print("| run | final eval (logged) | recomputed | held-out questions met in training | eval on the others |")
    print("|---|---|---|---|---|")
    for run_dir in runs:
        r = recheck(run_dir)
        print(f"| {os.path.relpath(run_dir, out)} | {r['logged']:.3f} | {r['recomputed']:.3f} | {r['n_seen']} | "
              f"{'-' if r['unseen'] is None else format(r['unseen'], '.3f')} |", flush=True)
        if abs(r["recomputed"] - r["logged"]) > 1e-9:
            raise SystemExit(f"error: {run_dir}: the recomputed accuracy differs from the logged one")


if __name__ == "__main__":
    main()
