"""Does the distillation do anything when the teacher knows more than the student? A laptop-scale study.

A tiny model is first taught to read (tiny_reader.py's pretrain_to_read: repeat an answer that the prompt
states, on random lessons, never the task), so that its teacher view, shown the answer, is right and its student
view is not. Then RL on two tasks made in code: 'toy' (easy: the second digit of a 2-digit number, 1 draw
in 10 right at the start) and 'toy-reverse' (hard: a 3-digit number reversed, about 1 in 1,000). Each
variant runs with the same seeds, questions and order:

    python benchmarks/distill_study.py                 # all of it: 2 tasks x 14 variants x 5 seeds
    python benchmarks/distill_study.py --seeds 0 --variants grpo teacher-reference --steps 20   # a look

One reader is pretrained per seed (OUT/reader-seedS, the same weights for every variant and task of that
seed, with toy-reverse's file); every run is a command of study_trainer.py, sdpg.py with the study's instruments
(benchmarks/compare.py runs it, and reuses a finished run of the same command). Writes RESULTS/summary.json (per
task, variant and seed: held-out accuracy of the student and of the teacher's view at each evaluation, the final
accuracy, the first step at which the accuracy reaches --reach), RESULTS/summary.md and RESULTS/curves.png (mean
over the seeds, lowest to highest seed shaded).
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import compare  # noqa: E402  (runs one command; the mean-and-spread of curves)
import tiny_reader  # noqa: E402  (the reader's pretraining and toy-reverse)

# Per task: steps, evaluation interval and held-out questions (the hard task has 112), answer length, flags.
TASKS = {
    "toy": dict(steps=100, eval_every=10, eval_n=100, max_new_tokens=2),
    "toy-reverse": dict(steps=200, eval_every=20, eval_n=80, max_new_tokens=4),
}
# Every run: the tiny demo's RL settings (PRESETS["tiny"]), which a reader loaded from a folder does not get.
COMMON = ["--batch-prompts", "16", "--group-size", "8", "--lr", "3e-3", "--alpha", "0.05", "--micro-batch", "128",
          "--save-every", "0"]
CONSTANT = ["--beta-warmup", "0", "--beta-decay", "0"]  # beta held constant (the released script's choice)
# Where the distillation was found to matter in a first look: beta 1, no gate, the frozen reference teaches.
FOUND = ["--beta", "1", "--no-gate", *CONSTANT, "--teacher", "reference"]
VARIANTS = {
    "grpo": ["--beta", "0"],  # the verifier alone: the GRPO-style baseline
    "sdpg-paper": [],  # beta 1e-3 with the gate and the warm-up/decay schedule, policy teacher
    "beta0.1-gate": ["--beta", "0.1", *CONSTANT],
    "beta1-gate": ["--beta", "1", *CONSTANT],
    "beta0.1-nogate": ["--beta", "0.1", "--no-gate", *CONSTANT],
    "beta1-nogate": ["--beta", "1", "--no-gate", *CONSTANT],  # the released script's gate, SDPG's own teacher
    # can SDPG's own teacher be kept from forgetting? a smaller learning rate, a stronger anchor
    "policy-lr3e-4": ["--beta", "1", "--no-gate", *CONSTANT, "--lr", "3e-4"],
    "policy-alpha0.5": ["--beta", "1", "--no-gate", *CONSTANT, "--alpha", "0.5"],
    # who teaches
    "teacher-reference": FOUND,
    "teacher-ema": ["--beta", "1", "--no-gate", *CONSTANT, "--teacher", "ema", "--ema-rate", "0.99"],
    # where the teacher's context comes from ('answer' is the same prompt as 'solution' here: no worked solutions)
    "context-other": [*FOUND, "--teacher-context", "other"],
    "context-peer": [*FOUND, "--teacher-context", "peer"],
    # what drives the distillation gradient (teacher-reference is the exact KL)
    "estimator-topk": [*FOUND, "--distill-estimator", "topk", "--distill-topk", "4"],
    "estimator-sampled": [*FOUND, "--distill-estimator", "sampled"],
}


STUDY_TRAINER = os.path.join(HERE, "study_trainer.py")


def torch_threads() -> None:  # one thread per reader's pretraining, as one per run
    import torch
    torch.set_num_threads(1)


def evaluations(rows: list[dict]) -> list[dict]:
    """The evaluation rows of one run: step, student accuracy, teacher's-view accuracy (None without teacher)."""
    return [{"step": r["step"], "accuracy": r["eval_accuracy"], "teacher_accuracy": r.get("eval_teacher_accuracy"),
             "kl_distill": r.get("kl_distill")} for r in rows if "eval_accuracy" in r]


def summarise(rows: list[dict], reach: float) -> dict:
    evals = evaluations(rows)
    train = [r for r in rows if "reward_mean" in r]
    return {"evals": evals, "final_accuracy": evals[-1]["accuracy"], "initial_accuracy": evals[0]["accuracy"],
            "initial_teacher_accuracy": evals[0]["teacher_accuracy"],
            "final_teacher_accuracy": evals[-1]["teacher_accuracy"],
            "steps_to_reach": next((e["step"] for e in evals if e["accuracy"] >= reach), None),
            "mean_gate_frac": statistics.mean(r["gate_frac"] for r in train),
            "final_kl_distill": statistics.mean(r["kl_distill"] for r in train[-10:]) if train[-1]["kl_distill"]
            is not None else None, "run_s": round(sum(r["time_s"] for r in train), 1)}


def mean_range(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def table(results: dict, reach: float, steps: int | None) -> str:
    out = []
    for task, by_variant in results.items():
        out += [f"### {task} ({steps or TASKS[task]['steps']} steps)", "",
                "| variant | student before | teacher before | student final | teacher final | "
                f"runs reaching {reach} (mean step) | distilled share (gate) | kl_distill (last 10 steps) |",
                "|---|---|---|---|---|---|---|---|"]
        for name, runs in by_variant.items():
            s = [x["summary"] for x in runs]
            hit = [x["steps_to_reach"] for x in s if x["steps_to_reach"] is not None]
            reached = f"{len(hit)}/{len(s)}" + (f" ({statistics.mean(hit):.0f})" if hit else "")
            gate = "-" if name == "grpo" else "all" if "--no-gate" in VARIANTS[name] else mean_range(
                [x["mean_gate_frac"] for x in s])
            out.append(f"| {name} | {mean_range([x['initial_accuracy'] for x in s])} | "
                       f"{mean_range([x['initial_teacher_accuracy'] for x in s])} | "
                       f"{mean_range([x['final_accuracy'] for x in s])} | "
                       f"{mean_range([x['final_teacher_accuracy'] for x in s])} | {reached} | {gate} | "
                       f"{mean_range([x['final_kl_distill'] for x in s])} |")
        out.append("")
    return "\n".join(out) + ("mean over the seeds (lowest-highest seed); accuracies are greedy pass@1 on held-out "
                             "questions\n")


# The figure's panels: one question each, the same variants in the same colours on both tasks.
PANELS = {
    "who teaches": ["grpo", "sdpg-paper", "beta1-nogate", "teacher-ema", "teacher-reference"],
    "beta and the gate (policy teacher)": ["grpo", "sdpg-paper", "beta0.1-gate", "beta1-gate", "beta0.1-nogate",
                                           "beta1-nogate", "policy-lr3e-4", "policy-alpha0.5"],
    "what the teacher is shown": ["grpo", "teacher-reference", "context-other", "context-peer"],
    "what drives the gradient": ["grpo", "teacher-reference", "estimator-topk", "estimator-sampled"],
}


def plot(results: dict, path: str) -> bool:
    """Per task (row) and question (column): the student's held-out accuracy against step, mean over the seeds
    (solid, lowest to highest seed shaded), and the teacher's view (dashed, the mean)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (summary.md is complete)")
        return False
    names = list(VARIANTS)
    colours = {name: plt.get_cmap("tab20").colors[i % 20] for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(results), len(PANELS), figsize=(5 * len(PANELS), 4.2 * len(results)), squeeze=False)
    for row, (task, by_variant) in enumerate(results.items()):
        for col, (question, variants) in enumerate(PANELS.items()):
            ax = axes[row][col]
            for name in (v for v in variants if v in by_variant):
                runs = by_variant[name]
                for key, style in (("accuracy", "-"), ("teacher_accuracy", "--")):
                    per_seed = [[(e["step"], e[key]) for e in x["summary"]["evals"] if e[key] is not None]
                                for x in runs]
                    if not all(per_seed):
                        continue
                    steps, mean, low, high = compare.mean_and_spread(per_seed)
                    ax.plot(steps, mean, style, color=colours[name], linewidth=1.6 if style == "-" else 1.0,
                            label=name if style == "-" else None)
                    if style == "-":
                        ax.fill_between(steps, low, high, color=colours[name], alpha=0.12, linewidth=0)
            ax.set_title(f"{task}: {question}", fontsize=10)
            ax.set_xlabel("training step")
            ax.set_ylim(-0.03, 1.03)
            if col == 0:
                ax.set_ylabel("held-out accuracy (greedy)")
            if row == 0:
                ax.legend(fontsize=7, loc="upper left")
    n_seeds = len(next(iter(next(iter(results.values())).values())))
    fig.suptitle(f"solid: the student, mean of {n_seeds} seeds, lowest to highest seed shaded; dashed: the "
                 "teacher's view (the teacher's weights shown the privileged prompt), mean", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/distill", help="folder for the readers and the runs")
    p.add_argument("--results", default=os.path.join(HERE, "results", "distill"),
                   help="folder for summary.json, summary.md and curves.png")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"any of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--steps", type=int, help="training steps of every run [default: each task's own]")
    p.add_argument("--reach", type=float, default=0.5, help="accuracy for 'steps to reach'")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each")
    p.add_argument("--figure-from", metavar="SUMMARY_JSON", help="only redraw curves.png (into --results) from a "
                   "summary.json this script wrote; nothing runs")
    args = p.parse_args()
    if args.figure_from:
        with open(args.figure_from) as f:
            saved = json.load(f)["results"]
        results = {task: {name: [{"seed": x["seed"], "summary": x} for x in runs] for name, runs in by_variant.items()}
                   for task, by_variant in saved.items()}
        os.makedirs(args.results, exist_ok=True)
        plot(results, os.path.join(args.results, "curves.png"))
        return
    t0 = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each run takes one core; --jobs of them go at once

    with ProcessPoolExecutor(args.jobs, initializer=torch_threads) as pool:
        readers = dict(zip(args.seeds, pool.map(tiny_reader.make_reader, args.seeds,
                                                [os.path.join(args.out, f"reader-seed{s}") for s in args.seeds])))
    print("readers:", json.dumps(readers), flush=True)

    def one_run(task: str, name: str, seed: int) -> list[dict]:
        t, reader = TASKS[task], os.path.join(args.out, f"reader-seed{seed}")
        data = task if task == "toy" else tiny_reader.task_file(reader, seed, t["eval_n"])
        flags = ["--model", reader, "--dataset", data, *COMMON,
                 "--steps", str(args.steps or t["steps"]), "--eval-every", str(t["eval_every"]),
                 "--eval-n", str(t["eval_n"]), "--max-new-tokens", str(t["max_new_tokens"]), *VARIANTS[name]]
        return compare.run(flags, seed, os.path.join(args.out, task, name, f"seed{seed}"), [], STUDY_TRAINER)

    with ThreadPoolExecutor(args.jobs) as pool:  # a thread only waits on its sdpg.py process
        futures = {(task, name, seed): pool.submit(one_run, task, name, seed)
                   for task in args.tasks for name in args.variants for seed in args.seeds}
        results = {task: {name: [] for name in args.variants} for task in args.tasks}
        for (task, name, seed), future in futures.items():
            results[task][name].append({"seed": seed, "summary": summarise(future.result(), args.reach)})
    wall = time.time() - t0

    os.makedirs(args.results, exist_ok=True)
    command = "python benchmarks/distill_study.py " + shlex.join(sys.argv[1:])
    text = table(results, args.reach, args.steps)
    print(text)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(f"`{command.strip()}`: {wall / 60:.1f} min wall clock, --jobs {args.jobs}\n\n"
                f"Readers (one per seed): {json.dumps(list(readers.values()))}\n\n{text}")
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump({"command": command.strip(), "wall_s": round(wall), "jobs": args.jobs, "reach": args.reach,
                   "readers": list(readers.values()),
                   "settings": {"common": COMMON, "tasks": TASKS, "variants": {n: VARIANTS[n] for n in args.variants}},
                   "results": {task: {name: [{"seed": x["seed"], **x["summary"]} for x in runs]
                                      for name, runs in by_variant.items()} for task, by_variant in results.items()}},
                  f, indent=1)
    if plot(results, os.path.join(args.results, "curves.png")):
        print(f"figure: {os.path.join(args.results, 'curves.png')}")
    print(f"took {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
