"""Does the self-distillation help? Run sdpg.py for SDPG and its ablations over several seeds, then
tabulate and plot the runs.

Every run goes through sdpg.py's public command line (nothing here re-implements training):

    python benchmarks/prepare_smollm2.py --out runs/smollm2
    python benchmarks/compare.py --out runs/compare --seeds 0 1 -- \
        --model runs/smollm2/model --dataset runs/smollm2/train.jsonl --steps 40 --lr 1e-5

Arguments after `--` go to every sdpg.py run. Variants (the paper's Appendix D.1 ablations):
sdpg-urkl (the default), sdpg-ufkl (ufkl reference KL), beta0 (no distillation: the RPG/GRPO-style
baseline) and beta0-alpha0 (no distillation, no anchor); an SDPG variant with `-beta<value>` appended
runs at that beta instead of the default 1e-3 (`sdpg-urkl-beta0.1`, `sdpg-ufkl-beta1`).
Writes OUT/VARIANT/seedS/ (each run's own output), OUT/summary.md, OUT/summary.json and, when
matplotlib is installed, OUT/curves.png.
"""

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "sdpg-urkl": [],
    "sdpg-ufkl": ["--kl-mode", "ufkl"],
    "beta0": ["--beta", "0"],
    "beta0-alpha0": ["--beta", "0", "--alpha", "0"],
}
CURVES = ["reward_mean", "eval_accuracy", "kl_distill", "entropy", "response_len"]


def variant_flags(name: str) -> list[str]:
    """sdpg.py flags for a variant name: a key of VARIANTS, or an SDPG one ending in -beta<value>."""
    if name in VARIANTS:
        return VARIANTS[name]
    base, has_beta, beta = name.partition("-beta")
    if has_beta and base in ("sdpg-urkl", "sdpg-ufkl"):
        try:
            return [*VARIANTS[base], "--beta", str(float(beta))]
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(
        f"unknown variant {name!r}: use one of {', '.join(VARIANTS)}, or sdpg-urkl/sdpg-ufkl with -beta<value> "
        "appended (sdpg-urkl-beta0.1)")


SDPG = os.path.join(ROOT, "sdpg.py")


def run(flags: list[str], seed: int, out: str, passthrough: list[str], script: str = SDPG) -> list[dict]:
    """One run of `script` (sdpg.py, or a study's trainer that takes its flags), or the finished one already in `out`
    if the same command made it; returns its metrics rows. An unfinished run in `out` is started again."""
    argv = [*passthrough, *flags, "--seed", str(seed), "--output-dir", out]
    command = [os.path.relpath(script, ROOT), *argv]
    record = os.path.join(out, "command.json")
    if os.path.isdir(os.path.join(out, "final")):
        if not os.path.isfile(record) or json.load(open(record)) != command:
            raise SystemExit(f"error: {out} holds a finished run made by another command (see its config.json); "
                             "give another --out, or delete that folder to rerun it")
        print(f"reusing the finished run in {out}", flush=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        print("running:", shlex.join(command), flush=True)
        done = subprocess.run([sys.executable, script, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: the run in {out} failed:\n{done.stderr[-3000:]}")
        with open(record, "w") as f:
            json.dump(command, f)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def moving_average(xs: list[float], k: int) -> list[float]:
    return [statistics.mean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def summarise(rows: list[dict], threshold: float, window: int) -> dict:
    """Final and best held-out accuracy, the reward and entropy averaged over the last `window` steps,
    and the first step at which the mean reward of the last `window` steps is >= threshold (counted
    from step `window` on: earlier averages cover too few steps, and one lucky group would count)."""
    evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    train = [r for r in rows if "reward_mean" in r]
    smooth = moving_average([r["reward_mean"] for r in train], window)
    reached = next((r["step"] for r, s in zip(train[window - 1:], smooth[window - 1:]) if s >= threshold), None)
    return {"final_eval": evals[-1], "best_eval": max(evals), "first_eval": evals[0], "steps_to_threshold": reached,
            "final_reward": smooth[-1] if smooth else None,
            "final_entropy": statistics.mean(r["entropy"] for r in train[-window:]) if train else None}


def mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def table(results: dict, n_seeds: int, threshold: float) -> str:
    lines = [f"| variant | eval before | final eval | best eval | reward (last, smoothed) | entropy (last, smoothed) "
             f"| steps to reward {threshold} |",
             "|---|---|---|---|---|---|---|"]
    for name, per_seed in results.items():
        s = [x["summary"] for x in per_seed]
        reached = [x["steps_to_threshold"] for x in s]
        hit = f"{sum(r is not None for r in reached)}/{n_seeds} runs" + (
            f", mean {statistics.mean([r for r in reached if r is not None]):.0f}" if any(r is not None for r in reached) else "")
        lines.append(f"| {name} | {mean_sd([x['first_eval'] for x in s])} | {mean_sd([x['final_eval'] for x in s])} | "
                     f"{mean_sd([x['best_eval'] for x in s])} | {mean_sd([x['final_reward'] for x in s])} | "
                     f"{mean_sd([x['final_entropy'] for x in s])} | {hit} |")
    return "\n".join(lines) + f"\n\nmean ± sd over {n_seeds} seed(s)\n"


LABELS = {"reward_mean": "training reward (fraction right)", "eval_accuracy": "evaluation accuracy (greedy)",
          "kl_distill": "KL(student || teacher), nats/token", "entropy": "entropy, nats/token",
          "response_len": "answer length, tokens"}


def mean_and_spread(per_seed: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """At each step that every seed logged: the mean over seeds, the lowest and the highest value."""
    common = sorted(set.intersection(*(set(dict(pts)) for pts in per_seed)))
    values = [[dict(pts)[step] for pts in per_seed] for step in common]
    return common, [statistics.mean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot(results: dict, path: str, window: int) -> bool:
    """One line per variant (the mean over its seeds), the range between its lowest and highest seed shaded.
    Training curves are smoothed per run with a --window moving average first; evaluations are not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the table above is complete)")
        return False
    fig, grid = plt.subplots(2, 3, figsize=(12, 6.4))
    axes = grid.flatten()
    for ax, key in zip(axes, CURVES):
        for colour, (name, runs) in enumerate(results.items()):
            per_seed = []
            for x in runs:
                pts = [(r["step"], r[key]) for r in x["rows"] if r.get(key) is not None]
                if pts and key != "eval_accuracy":
                    pts = list(zip([s for s, _ in pts], moving_average([y for _, y in pts], window)))
                per_seed.append(pts)
            if not all(per_seed):
                continue
            steps, mean, low, high = mean_and_spread(per_seed)
            ax.plot(steps, mean, color=f"C{colour}", marker="o" if key == "eval_accuracy" else None,
                    label=f"{name} ({len(runs)} seeds)")
            ax.fill_between(steps, low, high, color=f"C{colour}", alpha=0.15, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(LABELS[key])
    axes[-1].axis("off")  # five curves on a 2 x 3 grid; the legend goes in the sixth cell
    axes[-1].legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=8,
                    title="line: mean over seeds\nshaded: lowest to highest seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    argv = sys.argv[1:]
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage="%(prog)s [options] -- SDPG_FLAGS",
                                epilog="SDPG_FLAGS, after --, go to every sdpg.py run (see python sdpg.py --help).")
    p.add_argument("--out", default="runs/compare", help="folder for the runs and the summary")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="one run per variant and seed")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT",
                   help=f"any of {', '.join(VARIANTS)}; sdpg-urkl-beta0.1 = sdpg-urkl at beta 0.1 (default: the four)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (on a small CPU, set OMP_NUM_THREADS so that "
                   "jobs x threads <= cores; on a GPU, several small runs share the card)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="reward level for 'steps to threshold', reached by the reward averaged over --window steps")
    p.add_argument("--window", type=int, default=10, help="moving-average window for rewards, in steps")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if args.jobs < 1 or args.window < 1:
        p.error("--jobs and --window must be >= 1")
    if len(set(args.seeds)) < len(args.seeds) or len(set(args.variants)) < len(args.variants):
        p.error("a seed or variant is listed twice (two runs would write one folder)")
    try:
        variants = {name: variant_flags(name) for name in args.variants}
    except argparse.ArgumentTypeError as e:
        p.error(str(e))

    # Runs are independent processes; --jobs of them go at once (a thread here only waits on its process).
    pool = ThreadPoolExecutor(args.jobs)
    futures = {(name, seed): pool.submit(run, flags, seed, os.path.join(args.out, name, f"seed{seed}"), passthrough)
               for name, flags in variants.items() for seed in args.seeds}
    wait(futures.values(), return_when=FIRST_EXCEPTION)
    failed = next((f for f in futures.values() if f.done() and f.exception()), None)
    if failed:  # report at once, start nothing new, let the runs already going finish
        print(failed.exception(), file=sys.stderr, flush=True)
        pool.shutdown(cancel_futures=True)
        raise SystemExit(1)
    pool.shutdown()
    results = {name: [] for name in variants}
    for (name, seed), future in futures.items():
        rows = future.result()
        results[name].append({"seed": seed, "rows": rows, "summary": summarise(rows, args.threshold, args.window)})
    text = table(results, len(args.seeds), args.threshold)
    print(text)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(f"sdpg.py flags for every run: {shlex.join(passthrough)}\n\n{text}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({n: [{"seed": x["seed"], **x["summary"]} for x in v] for n, v in results.items()}, f, indent=2)
    if plot(results, os.path.join(args.out, "curves.png"), args.window):
        print(f"plot: {os.path.join(args.out, 'curves.png')}")


if __name__ == "__main__":
    main()
