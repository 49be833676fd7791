"""Draw one picture of one or more sdpg.py runs from their metrics.jsonl files.

    python benchmarks/plot_run.py runs/demo_sdpg runs/demo_beta0 -o run_plot.png

Six panels against the training step, one colour per run (labelled by its directory): the training
reward (faint: each step; solid: the mean of the last --window steps), held-out accuracy (greedy
pass@1, and mean@K or any other eval_ key when the run logged it), the distillation KL, the reference
KL, entropy and answer length. A metric that a run logged as null or not at all (kl_distill with
--beta 0) is left out for that run. A run still going can be drawn: a half-written last line is skipped.
Needs matplotlib (pip install matplotlib); nothing else, not even sdpg.py.
"""

import argparse
import json
import os
import statistics

# (key, panel title); "eval_" stands for every held-out evaluation key, drawn in one panel.
PANELS = [("reward_mean", "training reward (fraction right)"), ("eval_", "held-out accuracy"),
          ("kl_distill", "KL(student || teacher), nats/token"), ("kl_ref", "KL(policy || initial), k3, nats/token"),
          ("entropy", "entropy of the policy, nats/token"), ("response_len", "answer length, tokens")]
EVAL_NAMES = {"eval_accuracy": "greedy pass@1", "eval_mean_at_k": "mean@K"}  # others show as their key
EVAL_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "v")]  # line and marker of the 1st, 2nd... eval key


def read_run(run_dir: str) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl; one line of error when there are none to draw."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: no metrics.jsonl in {run_dir} (give the --output-dir of an sdpg.py run)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.endswith("\n")]  # the last line may be half-written
    if not rows:
        raise SystemExit(f"error: {path} has no rows yet: nothing to draw")
    return rows


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Each value replaced by the mean of it and the window - 1 before it (fewer at the start)."""
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that hold a number for key."""
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def eval_keys(runs: dict[str, list[dict]]) -> list[str]:
    """Every eval_ key that some run logged: eval_accuracy, then eval_mean_at_k, then the others by name."""
    found = {k for rows in runs.values() for r in rows for k in r if k.startswith("eval_")}
    known = [k for k in EVAL_NAMES if k in found]
    return known + sorted(found - set(known))


def draw(runs: dict[str, list[dict]], window: int):
    """The figure: a 2 x 3 grid sharing the step axis, one legend for the runs above it. Each line is
    labelled 'RUN KEY' ('RUN reward_mean raw' for the faint reward) so that a test can find it."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plot_run.py needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, grid = plt.subplots(2, 3, figsize=(13, 6.8), sharex=True)
    evals = eval_keys(runs)
    styles = [EVAL_STYLES[i % len(EVAL_STYLES)] for i in range(len(evals))]
    for ax, (panel, title) in zip(grid.flat, PANELS):
        keys = evals if panel == "eval_" else [panel]
        drawn = False
        for i, (name, rows) in enumerate(runs.items()):
            for k in keys:
                steps, values = curve(rows, k)
                drawn |= bool(steps)
                if k == "reward_mean":  # noisy: each step faint, the trailing mean solid
                    ax.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8, label=f"{name} {k} raw")
                    values = trailing_mean(values, window)
                line, marker = styles[keys.index(k)] if panel == "eval_" else ("-", None)
                ax.plot(steps, values, color=f"C{i}", linestyle=line, marker=marker, markersize=4, linewidth=1.6,
                        label=f"{name} {k}")
        if panel == "reward_mean":
            title += f"\nfaint: each step; solid: mean of the last {window}"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", va="center", transform=ax.transAxes,
                    color="grey")
            ax.set_yticks([])
        if panel == "eval_" and evals:  # which evaluation each line style is
            ax.legend([Line2D([], [], color="grey", linestyle=s, marker=m) for s, m in styles],
                      [EVAL_NAMES.get(k, k) for k in evals], fontsize=8)
    for ax in grid[-1]:
        ax.set_xlabel("training step")
    fig.legend([Line2D([], [], color=f"C{i}", linewidth=2) for i in range(len(runs))], list(runs),
               loc="upper center", ncol=min(len(runs), 4), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directories of sdpg.py runs")
    p.add_argument("-o", "--out", default="run_plot.png", help="the PNG to write (default: run_plot.png)")
    p.add_argument("--window", type=int, default=10, help="steps averaged in the smoothed reward (default: 10)")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error("--window must be >= 1")
    runs = {os.path.normpath(d): read_run(d) for d in args.runs}
    draw(runs, args.window).savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
