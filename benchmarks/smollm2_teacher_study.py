"""Does SDPG's own teacher keep its knowledge in a real model? The distillation study on SmolLM2-135M-Instruct.

The tiny study (distill_study.py) found that the policy as its own teacher forgets how to read within 20 steps,
and that only a frozen teacher lifts a task the student cannot do. Here the same question on a pretrained model:
SmolLM2-135M-Instruct asked "What is 37 times 43?" (two 2-digit numbers, held out on the pairs whose sum is a
multiple of 8) is almost never right, but shown the answer and the line "37 * 43 = 1591." it mostly is. So the
student almost never earns a reward, and the teacher almost always knows. Every variant starts from the same
model, questions and order:

    python benchmarks/prepare_smollm2.py --out runs/smollm2           # the model and the task files, once
    python benchmarks/smollm2_teacher_study.py                        # 6 variants x 3 seeds, hours on 2 cores
    python benchmarks/smollm2_teacher_study.py --seeds 0 --variants beta1-nogate --steps 10   # a look
    python benchmarks/smollm2_teacher_study.py --before           # both tasks before any RL, 20 min
    python benchmarks/smollm2_teacher_study.py --after            # do the collapsed teachers still read? 8 min
    python benchmarks/smollm2_teacher_study.py --stated           # answers that write the number? 17 min, 2 threads

Ctrl-C (or SIGTERM to its runs) stops it: each run finishes its step and saves a checkpoint, and no new run
starts. It continues where it stopped: a run interrupted mid-way continues from its last checkpoint (sdpg.py does
that when the same command runs again), and a finished run is never run again: its metrics are kept in
RESULTS/runs/VARIANT-seedS.json (with --commit, committed to git as soon as it finishes, so that they survive a
move to a fresh machine). Writes RESULTS/summary.json, summary.md and curves.png from every finished run.
"""

import argparse
import functools
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

INSTRUCTION = "Answer with one short sentence ending in the number."
# The model's settings: 2 questions x 8 answers of at most 24 tokens (the teacher's answers need about 20: its
# greedy accuracy was 0.67 at 16 new tokens and 0.85 at 24), lr 2e-5 (20x the paper's, for a few dozen steps to
# show a trend), an evaluation of both views on the 100 held-out questions every 10 steps, a checkpoint as often,
# so that an interrupted run loses at most 10 steps.
COMMON = ["--dataset", "runs/smollm2/multiply.jsonl", "--model", "runs/smollm2/model", "--instruction", INSTRUCTION,
          "--batch-prompts", "2", "--group-size", "8", "--max-new-tokens", "24", "--lr", "2e-5", "--micro-batch", "16",
          "--eval-every", "10", "--eval-n", "100", "--save-every", "10"]
CONSTANT = ["--beta-warmup", "0", "--beta-decay", "0"]  # beta held constant (the released script's choice)
DISTIL = ["--beta", "1", "--no-gate", *CONSTANT]  # every reward is 0 at first: the gate would never open
# A teacher prompt that only states the answer and the solution: no instruction about routes or about not
# mentioning the answer, whose words might leak into the student.
PLAIN_TEMPLATE = "{question}\n{instruction}\n\nFinal answer: {answer}\nWorked solution: {solution}"
VARIANTS = {
    "beta0": ["--beta", "0"],  # the verifier alone
    "sdpg-paper": [],  # beta 1e-3, the gate, the warm-up/decay schedule, the policy teaches
    "beta1-nogate": DISTIL,  # the policy teaches
    "beta1-nogate-reference": [*DISTIL, "--teacher", "reference"],  # the frozen initial model teaches
    "beta1-nogate-plain": [*DISTIL, "--teacher-template", "PLAIN"],  # the policy, shown PLAIN_TEMPLATE
    "beta1-nogate-lr1e-6": [*DISTIL, "--lr", "1e-6"],  # the policy at the paper's lr: may keep its teacher longer
}


def command(variant: str, seed: int, steps: int, out: str) -> list[str]:
    """The command line of one run, relative to the repository root: sdpg.py, or study_trainer.py for the plain
    template (the only flag sdpg.py does not have)."""
    flags = [f if f != "PLAIN" else os.path.join(out, "plain_template.txt") for f in VARIANTS[variant]]
    script = "benchmarks/study_trainer.py" if "--teacher-template" in flags else "sdpg.py"
    return [script, *COMMON, "--steps", str(steps), *flags, "--seed", str(seed),
            "--output-dir", os.path.join(out, variant, f"seed{seed}")]


def run(cmd: list[str], record: str, commit: "threading.Lock | None") -> list[dict]:
    """The metrics rows of one run: from its record if the same command made it, else by running it (continuing
    its output directory's checkpoint, if any); the record is written (and committed) when it finishes."""
    if os.path.isfile(record):
        with open(record) as f:
            saved = json.load(f)
        if saved["command"] == cmd:
            return saved["rows"]
        raise SystemExit(f"error: {record} was made by another command; delete it to run this one")
    out = cmd[cmd.index("--output-dir") + 1]
    if not os.path.isdir(os.path.join(ROOT, out, "final")):
        print("running:", shlex.join(cmd), flush=True)
        done = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {shlex.join(cmd)} failed:\n{done.stderr[-3000:]}")
        if not os.path.isdir(os.path.join(ROOT, out, "final")):  # stopped by a signal: it saved a checkpoint
            raise SystemExit(f"stopped before the end: {out} continues from its last checkpoint when rerun")
    with open(os.path.join(ROOT, out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    os.makedirs(os.path.dirname(record), exist_ok=True)
    with open(record + ".tmp", "w") as f:
        json.dump({"command": cmd, "rows": rows}, f)
    os.replace(record + ".tmp", record)
    for name in os.listdir(os.path.join(ROOT, out)):  # 1.6 GB each; the record and final/ are what is kept
        if name.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(ROOT, out, name))
    if commit is not None:
        with commit:  # one git command at a time; retried, since someone may be committing beside the study
            name = os.path.basename(record)[:-5]
            for _ in range(10):
                if not subprocess.run(["git", "add", record], cwd=ROOT).returncode and not subprocess.run(
                        ["git", "commit", "-q", "-m", f"SmolLM2 teacher study: {name} finished", "--", record],
                        cwd=ROOT).returncode:
                    break
                time.sleep(5)
            else:
                print(f"warning: could not commit {record}; commit it by hand", flush=True)
    return rows


def run_all(tasks: dict, jobs: int) -> dict:
    """Each task's result, `jobs` tasks at a time (a thread only waits on its process). Once one fails (a run that
    crashed, or one stopped by a signal), no task starts any more: the ones running finish, the rest wait for the
    next sitting; the first failure is raised."""
    stopped = threading.Event()

    def guarded(task):
        if stopped.is_set():
            raise SystemExit("not started: another run stopped first")
        try:
            return task()
        except BaseException:
            stopped.set()
            raise

    with ThreadPoolExecutor(jobs) as pool:
        futures = {key: pool.submit(guarded, task) for key, task in tasks.items()}
    return {key: future.result() for key, future in futures.items()}  # tasks start in order: a failure comes first


def evaluations(rows: list[dict]) -> list[dict]:
    return [{"step": r["step"], "student": r["eval_accuracy"], "teacher": r.get("eval_teacher_accuracy")}
            for r in rows if "eval_accuracy" in r]


def run_summary(rows: list[dict]) -> dict:
    """One run: its evaluations, the first and last, the KLs and entropy over its last 10 steps, its time."""
    evals, train = evaluations(rows), [r for r in rows if "reward_mean" in r]
    last = train[-10:]

    def mean_of(key):
        values = [r[key] for r in last if r.get(key) is not None]
        return statistics.mean(values) if values else None

    return {"evals": evals, "student_before": evals[0]["student"], "student_final": evals[-1]["student"],
            "student_best": max(e["student"] for e in evals), "teacher_before": evals[0]["teacher"],
            "teacher_final": evals[-1]["teacher"], "reward_mean": statistics.mean(r["reward_mean"] for r in train),
            "kl_distill_last10": mean_of("kl_distill"), "kl_ref_last10": mean_of("kl_ref"),
            "entropy_last10": mean_of("entropy"), "steps": train[-1]["step"],
            "run_s": round(sum(r["time_s"] for r in train))}


def mean_range(values: list, digits: int = 2) -> str:
    """'mean (lowest-highest)' of the values that are not None, '-' if none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| variant | seeds | student before | student final | student best | teacher view before | "
             "teacher view final | reward, mean over the run | kl_distill, last 10 steps | kl_ref, last 10 steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        if not runs:
            lines.append(f"| {name} | 0 | not run yet |  |  |  |  |  |  |  |")
            continue
        keys = ("student_before", "student_final", "student_best", "teacher_before", "teacher_final", "reward_mean",
                "kl_distill_last10", "kl_ref_last10")
        cells = [mean_range([r[key] for r in runs], 3 if key == "reward_mean" else 2) for key in keys]
        lines.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nmean over the seeds (lowest-highest seed); accuracies: greedy pass@1 on the 100 "
                               "held-out questions, the student's prompt and the teacher's (the teacher weights of "
                               "the variant: the policy, or the frozen reference)\n")


def by_step(results: dict[str, list[dict]]) -> str:
    """Every evaluation: per variant and view, the mean over its seeds at each step (lowest-highest seed)."""
    steps = sorted({e["step"] for runs in results.values() for r in runs for e in r["evals"]})
    lines = ["| variant | prompt | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for name, runs in results.items():
        for view in ("student", "teacher"):
            cells = [mean_range([e[view] for r in runs for e in r["evals"] if e["step"] == s]) for s in steps]
            if runs and any(c != "-" for c in cells):
                lines.append(f"| {name} | {view} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict]], path: str) -> bool:
    """Student and teacher-view accuracy against step: per variant the mean over its seeds, the range shaded."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure (the table is complete)")
        return False
    sys.path.insert(0, HERE)
    from compare import mean_and_spread
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for ax, view in zip(axes, ("student", "teacher")):
        for colour, (name, runs) in enumerate(results.items()):
            per_seed = [[(e["step"], e[view]) for e in r["evals"] if e[view] is not None] for r in runs]
            if not runs or not all(per_seed):
                continue
            steps, mean, low, high = mean_and_spread(per_seed)
            ax.plot(steps, mean, color=f"C{colour}", marker="osD^vx"[colour % 6], markersize=4 + 1.5 * colour,
                    zorder=9 - colour, label=f"{name} ({len(runs)} seed{'s' * (len(runs) > 1)})")  # smaller on top
            ax.fill_between(steps, low, high, color=f"C{colour}", alpha=0.15, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_title(f"{view}'s prompt" + (" (the question only)" if view == "student" else " (shown the answer)"))
    axes[0].set_ylabel("greedy accuracy, 100 held-out questions")
    axes[0].legend(fontsize=8, title="line: mean over seeds; shaded: lowest to highest", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def view_accuracy(model, tokenizer, held_out: list[dict], template: str, max_new_tokens: int = 24) -> float:
    """Greedy accuracy on held_out with `template` as the prompt (its slots filled from each question)."""
    graded = graded_answers(model, tokenizer, held_out, template, max_new_tokens)
    return sum(g["right"] for g in graded) / len(graded)


def prompts() -> dict[str, str]:
    import sdpg
    return {"student": sdpg.STUDENT_TEMPLATE, "teacher, sdpg.py's prompt": sdpg.TEACHER_TEMPLATE,
            "teacher, plain prompt": PLAIN_TEMPLATE}


def before_rl(tasks: tuple[str, ...] = ("multiply", "divide"), lengths: tuple[int, ...] = (16, 24, 32)) -> dict:
    """Greedy accuracy of the untrained model on each task's 100 held-out questions (the ones every run's
    evaluation asks), in the student's view and in both teacher views, at each answer length in tokens."""
    import sdpg
    model, tokenizer = sdpg.load_model(os.path.join(ROOT, "runs/smollm2/model"), 0)
    accuracy = {}
    for task in tasks:
        _, held_out = sdpg.load_examples(os.path.join(ROOT, f"runs/smollm2/{task}.jsonl"), 100, 0)
        for view, template in prompts().items():
            for n in lengths:
                accuracy[f"{task} | {view} | {n}"] = view_accuracy(model, tokenizer, held_out, template, n)
                print(task, view, n, accuracy[f"{task} | {view} | {n}"], flush=True)
    return accuracy


def after_rl(out: str, seeds: list[int]) -> dict:
    """Does a collapsed teacher still read? Each policy-teacher run's final model, on the 100 held-out questions,
    answering the teacher prompt its run never trained with (sdpg.py's prompt for the plain-prompt variant, the
    plain prompt for the others), and its greedy answer to the first held-out question in all three prompts."""
    import sdpg
    _, held_out = sdpg.load_examples(os.path.join(ROOT, "runs/smollm2/multiply.jsonl"), 100, 0)
    found = {"question": held_out[0]["question"], "runs": {}}
    for variant in ("beta1-nogate", "beta1-nogate-lr1e-6", "beta1-nogate-plain"):
        for seed in seeds:
            path = os.path.join(ROOT, out, variant, f"seed{seed}", "final")
            if not os.path.isdir(path):
                continue
            model, tokenizer = sdpg.load_model(path, 0)
            untrained = "teacher, sdpg.py's prompt" if variant == "beta1-nogate-plain" else "teacher, plain prompt"
            answers = {}
            for view, template in prompts().items():
                text = sdpg.fill_template(template, {"instruction": INSTRUCTION, **held_out[0]})
                _, _, ids, mask, _ = sdpg.answer_and_grade(model, tokenizer, sdpg.stop_token_ids(model, tokenizer),
                                                           [text], [held_out[0]["answer"]], 24, 0.0)
                answers[view] = tokenizer.decode(ids[0][mask[0].bool()], skip_special_tokens=True)
            found["runs"][f"{variant}-seed{seed}"] = {"prompt": untrained, "answers": answers,
                                                      "accuracy": view_accuracy(model, tokenizer, held_out,
                                                                                prompts()[untrained])}
            print(variant, seed, found["runs"][f"{variant}-seed{seed}"], flush=True)
    return found


def one_line(text: str) -> str:
    """text as one markdown table cell: newlines and quotes escaped as in JSON, '|' escaped."""
    return json.dumps(text)[1:-1].replace("|", "\\|")


def after_table(found: dict) -> str:
    """after_rl's result as markdown: one row per run, its answers on one line each ('|' and newlines escaped)."""
    return ("each policy-teacher run's final model: greedy accuracy on the 100 held-out questions with the teacher "
            "prompt its run never trained with (with its own prompt: the run's step-60 evaluation in summary.md), "
            f"and its greedy answers (24 new tokens) to \"{found['question']}\"\n\n| run | untrained teacher prompt "
            "| accuracy | answer, student's prompt | answer, sdpg.py's teacher prompt | answer, plain prompt |\n"
            "|---|---|---|---|---|---|\n" + "".join(
                f"| {run} | {r['prompt'].removeprefix('teacher, ')} | {r['accuracy']:.2f} | " + " | ".join(
                    one_line(a) for a in r["answers"].values()) + " |\n"
                for run, r in found["runs"].items()))


def states_the_number(text: str, gold: str) -> bool:
    """Whether the gold number is written in the text ('2,607' counts as 2607): the verifier also accepts "The
    answer is 33 * 79." (it evaluates the expression), an answer that restates the question without multiplying."""
    return gold.replace(",", "") in (n.replace(",", "") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text))


def graded_answers(model, tokenizer, held_out: list[dict], template: str, max_new_tokens: int = 24) -> list[dict]:
    """Greedy answers to each held-out question with `template` as the prompt: the text, the verifier's verdict,
    and whether it states the number. The same calls as sdpg.evaluate's (batches of 16, as the runs' 2 x 8), so
    the verdicts equal the runs' evaluations on the same prompt (--stated gave back all 18 step-60 evaluations)."""
    import sdpg
    graded, stop_ids = [], sdpg.stop_token_ids(model, tokenizer)
    for i in range(0, len(held_out), 16):
        rows = held_out[i:i + 16]
        texts = [sdpg.fill_template(template, {"instruction": INSTRUCTION, **ex}) for ex in rows]
        _, _, ids, mask, correct = sdpg.answer_and_grade(model, tokenizer, stop_ids, texts,
                                                         [ex["answer"] for ex in rows], max_new_tokens, 0.0)
        for ex, said, ok in zip(rows, sdpg.decode_responses(tokenizer, ids, mask), correct.tolist()):
            graded.append({"answer": said, "right": bool(ok), "stated": bool(ok) and states_the_number(said,
                                                                                                     ex["answer"])})
    return graded


def stated(out: str, results: str, seeds: list[int], load=None) -> dict:
    """Every finished run's final model (and the untrained one) re-graded on the 100 held-out questions: right by
    the verifier, and right with the number written; in the student's prompt, and for the runs whose teacher is the
    policy, in their teacher prompt; with the first right answer that does not write the number and the first wrong
    one. `logged` is the run's own step-60 evaluation, which `right` must equal.
    Written to RESULTS/stated.json after each model; a model already there is not graded again."""
    import sdpg
    load = load or (lambda path: sdpg.load_model(path, 0))
    _, held_out = sdpg.load_examples(os.path.join(ROOT, "runs/smollm2/multiply.jsonl"), 100, 0)
    models = {"untrained": (os.path.join(ROOT, "runs/smollm2/model"), None)}
    for variant in VARIANTS:
        for seed in seeds:
            record = os.path.join(results, "runs", f"{variant}-seed{seed}.json")
            if os.path.isfile(record) and os.path.isdir(os.path.join(ROOT, out, variant, f"seed{seed}", "final")):
                models[f"{variant}-seed{seed}"] = (os.path.join(ROOT, out, variant, f"seed{seed}", "final"), record)
    saved, found = os.path.join(results, "stated.json"), {}
    if os.path.isfile(saved):
        with open(saved) as f:
            found = json.load(f)
    for name, (path, record) in models.items():
        if name in found:
            continue
        model, tokenizer = load(path)
        views = {"student": sdpg.STUDENT_TEMPLATE}
        variant = name.rsplit("-seed", 1)[0]
        if variant not in ("beta0", "beta1-nogate-reference"):  # the untrained model and the policy teachers
            views["teacher"] = PLAIN_TEMPLATE if variant == "beta1-nogate-plain" else sdpg.TEACHER_TEMPLATE
        found[name], logged = {}, {}
        if record:
            with open(record) as f:
                logged = evaluations(json.load(f)["rows"])[-1]
        for view, template in views.items():
            graded = graded_answers(model, tokenizer, held_out, template)
            unstated = [g["answer"] for g in graded if g["right"] and not g["stated"]]
            wrong = [g["answer"] for g in graded if not g["right"]]
            found[name][view] = {"right": sum(g["right"] for g in graded) / len(graded),
                                 "stated": sum(g["stated"] for g in graded) / len(graded),
                                 "logged": logged.get(view), "unstated_example": unstated[0] if unstated else None,
                                 "wrong_example": wrong[0] if wrong else None}
        print(name, found[name], flush=True)
        with open(saved + ".tmp", "w") as f:
            json.dump(found, f, indent=1)
        os.replace(saved + ".tmp", saved)
    return {name: found[name] for name in models}  # in the order of VARIANTS


def stated_table(found: dict) -> str:
    """stated()'s result as markdown: one row per model, right / right with the number, per view."""
    def cell(v):
        return "-" if v is None else f"{v['right']:.2f} / {v['stated']:.2f}" + (
            "" if v["logged"] is None or abs(v["logged"] - v["right"]) < 1e-9 else f" (logged {v['logged']:.2f})")

    def example(run, key):
        said = next((v[key] for v in run.values() if v[key]), None)
        return "" if said is None else one_line(said)

    return ("each final model's greedy answers (24 new tokens) to the 100 held-out questions, graded: right by the "
            "verifier / right with the number written (the verifier also accepts \"The answer is 33 * 79.\"); the "
            "teacher view only where the run's teacher is its policy (in the prompt it trained with)\n\n"
            "| model | student's prompt | teacher's prompt | a right answer without the number | a wrong answer |\n"
            "|---|---|---|---|---|\n" + "".join(
                f"| {name} | {cell(run['student'])} | {cell(run.get('teacher'))} | "
                f"{example(run, 'unstated_example')} | {example(run, 'wrong_example')} |\n"
                for name, run in found.items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/smollm2-teacher", help="folder of the runs (relative to the repository)")
    p.add_argument("--results", default=os.path.join(HERE, "results", "smollm2-teacher"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"any of {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--steps", type=int, default=60, help="training steps of every run")
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each")
    p.add_argument("--commit", action="store_true", help="git-commit each finished run's record as it lands")
    p.add_argument("--summary-only", action="store_true", help="only write the summary from the records there")
    p.add_argument("--before", action="store_true", help="only measure both tasks before any RL: RESULTS/before_rl.*")
    p.add_argument("--after", action="store_true", help="only measure the policy-teacher runs' final models with the "
                   "teacher prompt they never trained with: RESULTS/after_rl.*")
    p.add_argument("--stated", action="store_true", help="only re-grade every finished run's final model: how many "
                   "right answers write the number itself: RESULTS/stated.*")
    args = p.parse_args(argv)
    for need in ("runs/smollm2/model", "runs/smollm2/multiply.jsonl"):
        if not args.summary_only and not os.path.exists(os.path.join(ROOT, need)):
            raise SystemExit(f"error: no {need}: run python benchmarks/prepare_smollm2.py --out runs/smollm2 first")
    sys.path.insert(0, ROOT)
    if args.after:
        threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
        found = after_rl(args.out, args.seeds)
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "after_rl.json"), "w") as f:
            json.dump(found, f, indent=1)
        with open(os.path.join(args.results, "after_rl.md"), "w") as f:
            f.write(f"`python benchmarks/smollm2_teacher_study.py --after` ({threads} thread(s)): {after_table(found)}")
        return
    if args.stated:
        threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
        found = stated(args.out, args.results, args.seeds)
        with open(os.path.join(args.results, "stated.md"), "w") as f:
            f.write(f"`python benchmarks/smollm2_teacher_study.py --stated` ({threads} thread(s)): "
                    + stated_table(found))
        return
    if args.before:
        threads = os.environ.setdefault("OMP_NUM_THREADS", "1")
        accuracy = before_rl()
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "before_rl.json"), "w") as f:
            json.dump(accuracy, f, indent=1)
        with open(os.path.join(args.results, "before_rl.md"), "w") as f:
            f.write(f"`python benchmarks/smollm2_teacher_study.py --before` ({threads} thread(s)): greedy "
                    "accuracy of the untrained SmolLM2-135M-Instruct on each task's 100 held-out questions, the "
                    f"instruction \"{INSTRUCTION}\"\n\n| task | prompt | new tokens | accuracy |\n|---|---|---|---|\n"
                    + "".join(f"| {key} | {value:.2f} |\n" for key, value in accuracy.items()))
        return
    os.makedirs(os.path.join(ROOT, args.out), exist_ok=True)
    with open(os.path.join(ROOT, args.out, "plain_template.txt"), "w") as f:
        f.write(PLAIN_TEMPLATE)
    os.environ["OMP_NUM_THREADS"] = "1"  # each run takes one core; --jobs of them go at once
    t0 = time.time()
    jobs = [(name, seed) for seed in args.seeds for name in args.variants]  # seed by seed: 3 seeds land early
    records = {job: os.path.join(args.results, "runs", f"{job[0]}-seed{job[1]}.json") for job in jobs}
    results = {name: [] for name in args.variants}
    if args.summary_only:
        for (name, seed), record in records.items():
            if os.path.isfile(record):
                with open(record) as f:
                    results[name].append({"seed": seed, **run_summary(json.load(f)["rows"])})
    else:
        lock = threading.Lock() if args.commit else None
        tasks = {job: functools.partial(run, command(*job, args.steps, args.out), records[job], lock) for job in jobs}
        for (name, seed), rows in run_all(tasks, args.jobs).items():
            results[name].append({"seed": seed, **run_summary(rows)})
    text = table(results) + "\nEvery evaluation, greedy accuracy on the 100 held-out questions:\n\n" + by_step(results)
    print(text)
    os.makedirs(args.results, exist_ok=True)
    settings = f"sdpg.py flags of every run: `{shlex.join(COMMON)} --steps {args.steps}`"
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(f"`python benchmarks/smollm2_teacher_study.py {shlex.join(sys.argv[1:])}`".replace(" `", "`")
                + f" ({(time.time() - t0) / 60:.0f} min this sitting)\n\n{settings}\n\n{text}")
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump({"common": COMMON, "steps": args.steps, "variants": {n: VARIANTS[n] for n in args.variants},
                   "plain_template": PLAIN_TEMPLATE, "results": results}, f, indent=1)
    if plot(results, os.path.join(args.results, "curves.png")):
        print(f"figure: {os.path.join(args.results, 'curves.png')}")


if __name__ == "__main__":
    main()
