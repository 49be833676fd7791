"""Tests of what lives beside sdpg.py in benchmarks/: the benchmark scripts, the studies' harnesses, the tiny reader
and the study trainer's instruments (other teachers, contexts and KL estimators). CPU only, no network.

    python -m pytest -q            (from the repository root: every test of the project)
"""

import contextlib
import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]
import sdpg  # noqa: E402
import study_trainer  # noqa: E402
import tiny_reader  # noqa: E402
from verifiers import math_reward  # noqa: E402

HANG_TIMEOUT = 900  # seconds: a bound against a hang only
HANG_S = 30.0
MATRIX = r"\begin{pmatrix} 0 & 3 \\ 0 & -1 \end{pmatrix}"


@pytest.fixture(scope="module")
def tiny():
    tok = sdpg.build_char_tokenizer()
    return sdpg.build_tiny_model(tok, seed=0), tok


def _rows(path):
    return [json.loads(line) for line in open(path)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _models(model, tok, teacher=None):
    return sdpg.Models(model, None, model if teacher is None else teacher, model, tok, [tok.eos_token_id])


@contextlib.contextmanager
def _installed(argv):
    """study_trainer's instruments installed for the flags, then sdpg.py's own functions put back."""
    names = ("_chunk_terms", "build_models", "build_optimizer", "collect_rollouts", "evaluate", "templates_for")
    kept = {name: getattr(sdpg, name) for name in names}
    opts, rest = study_trainer.parse(argv)
    try:
        study_trainer.install(opts)
        yield opts, rest
    finally:
        for name, fn in kept.items():
            setattr(sdpg, name, fn)


def test_doctests():
    import doctest
    result = doctest.testmod(study_trainer)
    assert result.attempted > 0 and result.failed == 0


# -----------------------------------------------------------------------------
# The benchmark scripts and the comparison harness

def test_benchmark_smoke(tmp_path):
    """The benchmark runs end to end at the tiny shape and writes every row with finite, positive numbers."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(HERE, "bench_sdpg.py"), "--shape", "tiny", "--device", "cpu",
           "--prompt-len", "8", "--context-len", "8", "--response-len", "16", "--steps", "1",
           "--rollout-answers", "8", "16", "--rollout-tokens", "4", "8", "--rollout-prompt-lens", "3", "9",
           "--baseline-max-tokens", "4", "--jitter", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| step | mode | grad ckpt |" in proc.stdout and "ms per decoding step" in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["shape"] == "tiny" and "--shape tiny" in result["meta"]["command"]
    rows = result["rows"]
    positive = lambda x: isinstance(x, float) and math.isfinite(x) and x > 0  # noqa: E731

    updates = {(r["mode"], r["grad_ckpt"]): r for r in rows if r["kind"] == "update"}
    assert set(updates) == {("GRPO", False), ("GRPO", True), ("SDPG", False), ("SDPG", True)}
    (whole,) = [r for r in rows if r["kind"] == "whole_step"]
    for r in [*updates.values(), whole]:
        assert positive(r["time_s"]) and positive(r["peak_gib"]), r
    assert positive(whole["first_step_s"])
    ratios = [r for r in rows if r["kind"] == "update_ratio"]
    assert sorted(r["grad_ckpt"] for r in ratios) == [False, True]
    assert all(positive(r["time_ratio"]) for r in ratios)

    # sdpg.generate at every shape; model.generate only up to --baseline-max-tokens; prompts left-padded
    rollouts = {(r["sampler"], r["answers"], r["max_new_tokens"]): r for r in rows if r["kind"] == "rollout"}
    assert set(rollouts) == {("sdpg.generate", n, t) for n in (8, 16) for t in (4, 8)} | \
        {("model.generate", n, 4) for n in (8, 16)}
    for (_, n, t), r in rollouts.items():
        assert 1 <= r["new_tokens"] <= t and r["prompt_len"] <= 9, r
        assert positive(r["ms_per_step"]) and r["tokens_per_s"] == pytest.approx(n * r["new_tokens"] / r["time_s"])
    speedups = {(r["answers"], r["new_tokens"]) for r in rows if r["kind"] == "rollout_ratio"
                and positive(r["throughput_ratio"])}
    assert speedups == {(8, 4), (16, 4)}
    assert len([r for r in rows if r["kind"] == "decode_setup"]) == 4
    jitter = [r for r in rows if r["kind"] == "jitter"]
    assert sorted((r["answers"], r["gc"]) for r in jitter) == [(8, "off"), (8, "on"), (16, "off"), (16, "on")]
    assert all(r["new_tokens"] == 4 and 0 < r["median_ms"] <= r["max_ms"] for r in jitter)


def test_decode_check_passes_on_the_cpu(tmp_path):
    """benchmarks/decode_check.py, the GPU checks of the decoding loop, runs and passes at the tiny shape."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, os.path.join(HERE, "decode_check.py"), "--answers", "8", "--new-tokens", "12",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0 and "FAIL" not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["greedy answers equal model.generate's"] and result["rows_equal_to_model_generate"] == 1.0


def test_decode_step_clock_times_every_step_and_changes_nothing():
    """benchmarks/decode_step_times.py's clock: one timestamp per new token, the same answers as without it."""
    import decode_step_times as dst
    torch.manual_seed(0)
    model, _, _, stop_ids = dst.bench_sdpg.build_model("tiny", torch.device("cpu"))
    ids = torch.randint(0, stop_ids[0], (3, 5))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                    eos_token_id=stop_ids, pad_token_id=0)
    clock = dst.StepClock()
    start = time.perf_counter()
    timed = model.generate(input_ids=ids, logits_processor=[clock], **settings)
    end = time.perf_counter()
    assert torch.equal(timed, model.generate(input_ids=ids, **settings))
    assert timed.shape[1] - 5 == 10 and len(clock.times) == 10
    # read during the call, from the clock the script subtracts from (another clock, or times kept from
    # an earlier call, would give meaningless step times)
    assert start < clock.times[0] and clock.times[-1] < end


def test_sampling_dtype_smoke(tmp_path):
    """benchmarks/sampling_dtype.py runs at the tiny shape: both kinds of weights, every repeat, positive times."""
    out = tmp_path / "sd.json"
    cmd = [sys.executable, os.path.join(HERE, "sampling_dtype.py"), "--answers", "2", "3",
           "--repeats", "3", "--new-tokens", "4", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 3 | bf16 copy |" in proc.stdout
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"2", "3"}
    for rows in results.values():
        assert set(rows) == {"float32 weights", "bf16 copy"}
        for r in rows.values():
            assert len(r["runs"]) == 3 and all(x > 0 for x in r["runs"])
            # the summary is of these runs (a mean called median, or the first run called min, fails)
            assert (r["min"], r["median"], r["max"]) == (min(r["runs"]), statistics.median(r["runs"]), max(r["runs"]))


def test_compare_harness_smoke(tmp_path):
    out = tmp_path / "cmp"
    compare = [sys.executable, os.path.join(HERE, "compare.py"), "--out", str(out), "--seeds", "0"]
    cmd = [*compare, "--jobs", "2", "--variants", "sdpg-urkl", "beta0-alpha0", "--", "--model", "tiny", "--steps", "3",
           "--eval-n", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"sdpg-urkl", "beta0-alpha0"}
    assert all(0.0 <= s[0]["final_eval"] <= 1.0 for s in summary.values())
    # the ablation really ran without the teacher and the anchor
    rows = _rows(out / "beta0-alpha0" / "seed0" / "metrics.jsonl")
    assert rows[1]["kl_distill"] is None and rows[1]["kl_ref"] is None
    # the final evaluation, redone from the saved model, gives the logged accuracy (checked by the script)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "unseen_accuracy.py"), str(out)],
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0 and "| sdpg-urkl/seed0 |" in proc.stdout, proc.stderr[-2000:]
    # a rerun reuses finished runs with the same settings and refuses ones made with other settings
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0 and proc.stdout.count("reusing the finished run") == 2, proc.stderr[-2000:]
    proc = subprocess.run([*cmd, "--lr", "1e-4"], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode != 0 and "made by another command" in proc.stderr, proc.stderr[-2000:]
    # a failing run stops the harness with sdpg.py's own message and names the run
    proc = subprocess.run([*compare, "--variants", "beta0", "--", "--model", "tiny", "--steps", "0"],
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode != 0 and "beta0/seed0 failed" in proc.stderr and "--steps must be positive" in proc.stderr


def test_compare_variant_names_and_threshold():
    from compare import summarise, variant_flags

    assert variant_flags("beta0-alpha0") == ["--beta", "0", "--alpha", "0"]
    assert variant_flags("sdpg-ufkl-beta0.1") == ["--kl-mode", "ufkl", "--beta", "0.1"]
    for bad in ("sdpg", "beta0-beta1", "sdpg-urkl-betax"):
        with pytest.raises(Exception, match="unknown variant"):
            variant_flags(bad)
    # a lucky first step must not count: the first full 3-step mean >= 0.5 is at step 6 (0.2, 0.6, 0.8)
    rewards = [1.0, 0.0, 0.0, 0.2, 0.6, 0.8]
    rows = [{"step": 0, "eval_accuracy": 0.1}] + [{"step": i + 1, "reward_mean": r, "entropy": 2.0 - r}
                                                  for i, r in enumerate(rewards)]
    rows[-1]["eval_accuracy"] = 0.4
    s = summarise(rows, threshold=0.5, window=3)
    assert s["steps_to_threshold"] == 6 and s["first_eval"] == 0.1 and s["final_eval"] == 0.4
    assert s["final_reward"] == pytest.approx(statistics.mean(rewards[-3:]))
    assert s["final_entropy"] == pytest.approx(2.0 - statistics.mean(rewards[-3:]))


def test_compare_plot_mean_and_spread_over_seeds():
    """The comparison figure's line is the mean over seeds and its band the lowest to highest seed, at the
    steps every seed logged (guards a band drawn from one seed, or a mean over misaligned steps)."""
    from compare import mean_and_spread

    seeds = [[(0, 0.1), (10, 0.5), (20, 0.9)], [(0, 0.3), (10, 0.1)], [(0, 0.2), (10, 0.3), (20, 0.0)]]
    steps, mean, low, high = mean_and_spread(seeds)
    assert steps == [0, 10]  # step 20 is missing from the second seed
    assert mean == pytest.approx([0.2, 0.3]) and low == [0.1, 0.1] and high == [0.3, 0.5]


def test_distill_study_summary_and_figure_from_metrics_rows(tmp_path):
    """The study's per-run summary: the first evaluation reaching the stated accuracy, the final student and
    teacher accuracies, the gate's mean share; the figure redraws from the summary.json it writes."""
    import distill_study

    def rows(accuracies, teacher):
        out = [{"step": 0, "eval_accuracy": accuracies[0], **({"eval_teacher_accuracy": 1.0} if teacher else {})}]
        for step, acc in enumerate(accuracies[1:], start=1):
            out.append({"step": step, "reward_mean": acc, "gate_frac": 0.25, "time_s": 0.1,
                        "kl_distill": 0.5 if teacher else None, "eval_accuracy": acc,
                        **({"eval_teacher_accuracy": 1.0 - acc} if teacher else {})})
        return out

    s = distill_study.summarise(rows([0.0, 0.2, 0.6, 0.4], teacher=True), reach=0.5)
    assert s["steps_to_reach"] == 2 and s["final_accuracy"] == 0.4 and s["initial_teacher_accuracy"] == 1.0
    assert s["final_teacher_accuracy"] == pytest.approx(0.6) and s["mean_gate_frac"] == 0.25
    assert distill_study.summarise(rows([0.0, 0.1], teacher=False), reach=0.5)["steps_to_reach"] is None
    run = lambda seed, name: distill_study.summarise(rows([0.0, 0.1 * seed, 0.3], name != "grpo"), 0.5)  # noqa: E731
    results = {task: {name: [{"seed": seed, "summary": run(seed, name)} for seed in (0, 1)]
                      for name in ("grpo", "teacher-reference")} for task in ("toy", "toy-reverse")}
    table = distill_study.table(results, 0.5, None)
    assert "| teacher-reference | 0.00 (0.00-0.00) | 1.00 (1.00-1.00) | 0.30 (0.30-0.30) |" in table
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib")
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"results": {t: {n: [{"seed": x["seed"], **x["summary"]} for x in runs]
                                                   for n, runs in by.items()} for t, by in results.items()}}))
    subprocess.run([sys.executable, os.path.join(HERE, "distill_study.py"), "--figure-from",
                    str(summary), "--results", str(tmp_path)], check=True, timeout=HANG_TIMEOUT)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_unseen_accuracy_knows_the_training_questions(tmp_path, monkeypatch):
    from unseen_accuracy import questions_met

    trained, collect = [], sdpg.collect_rollouts
    monkeypatch.setattr(sdpg, "collect_rollouts", lambda m, examples, args: (trained.extend(examples),
                                                                             collect(m, examples, args))[1])
    argv = ["--model", "tiny", "--dataset", "toy", "--steps", "4", "--batch-prompts", "3", "--eval-every", "0",
            "--seed", "5", "--output-dir", str(tmp_path / "run")]
    sdpg.main(argv)
    train, _ = sdpg.load_examples("toy", 8, 5)
    assert len(trained) == 12 and questions_met(train, sdpg.parse_args(argv)) == {ex["question"] for ex in trained}


def test_generated_word_problems_are_right():
    from prepare_smollm2 import make_problems

    problems = make_problems(200, seed=0)
    assert len({p["question"] for p in problems}) > 150
    for p in problems:
        assert math_reward(p["solution"], p["answer"]) == 1.0, p
        assert p["answer"] not in p["question"].split()



# -----------------------------------------------------------------------------
# The verifier comparison: ours against Math-Verify (an optional package; CI installs it)


@pytest.mark.parametrize("completion,gold,reward", [
    (r"So $\boxed{\frac{1}{2}}$.", "0.5", 1.0), (r"So $\boxed{3}$.", "4", 0.0), ("3 + 4 = 7\n#### 7", "7", 1.0),
    (r"So $\boxed{5 \leq x}$.", r"x \geq 5", 1.0), (rf"So $\boxed{{{MATRIX}}}$.", MATRIX, 1.0),
    (rf"So $\boxed{{{MATRIX}}}$.", MATRIX.replace("-1", "1"), 0.0), (None, "1", 0.0), (r"$\boxed{1}$", None, 0.0),
])
def test_math_verify_reward(completion, gold, reward):
    pytest.importorskip("math_verify", reason="Math-Verify is optional (pip install math-verify); CI installs it")
    from verifier_agreement import math_verify_reward
    assert math_verify_reward(completion, gold) == reward


def test_math_verify_time_is_bounded(monkeypatch):
    """Guards against a Math-Verify call without our timeouts (its defaults are 5 s per call): every parse and the
    comparison get MATH_VERIFY_TIMEOUT_S (checked on the calls, not on the clock), and a power tower that SymPy
    would work on for minutes comes back (a bound against a hang only)."""
    math_verify = pytest.importorskip("math_verify", reason="Math-Verify is optional (pip install math-verify); "
                                                            "CI installs it")
    import verifier_agreement
    monkeypatch.setattr(verifier_agreement, "MATH_VERIFY_TIMEOUT_S", 1)
    calls = []

    def recording(name: str, timeout_key: str):
        real = getattr(math_verify, name)

        def call(*args, **kwargs):
            calls.append((name, kwargs.get(timeout_key)))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(math_verify, "parse", recording("parse", "parsing_timeout"))
    monkeypatch.setattr(math_verify, "verify", recording("verify", "timeout_seconds"))
    start = time.perf_counter()
    assert verifier_agreement.math_verify_reward(r"So $\boxed{9^{9^{9^{9}}}}$.", "1") == 0.0
    assert time.perf_counter() - start < HANG_S
    assert calls == [("parse", 1), ("parse", 1), ("verify", 1)]


def test_the_math_style_set_differs_from_its_hand_labels_only_by_stated_policy():
    """The MATH-style cases of benchmarks/verifier_agreement.py carry a hand label (would a careful grader accept
    the answer?). Guards against a rule that drifts from it: ours may differ only where a note names the policy."""
    from verifier_agreement import MATH_STYLE, completion_of
    assert len(MATH_STYLE) >= 100 and len({(answer, gold) for answer, gold, *_ in MATH_STYLE}) == len(MATH_STYLE)
    off = [(answer, gold) for answer, gold, right, _, note in MATH_STYLE
           if (math_reward(completion_of(answer), gold) == 1.0) is not (right is not note.startswith("P:"))]
    assert not off, off


def test_verifier_agreement_smoke(tmp_path, monkeypatch):
    pytest.importorskip("math_verify", reason="Math-Verify is optional (pip install math-verify); CI installs it")
    import verifier_agreement
    rows = [{"question": "q", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
            {"question": "q", "answer": "She answered 3 of them, then 3 + 2 = <<3+2=5>>5.\n#### 5"}]
    gsm8k = _write_jsonl(tmp_path / "train.jsonl", rows)
    monkeypatch.setattr(verifier_agreement, "MATH_STYLE", [("2x > 4", "x > 2", True, "relation", ""),
                                                           ("0.333333", r"\frac{1}{3}", False, "fraction", "")])
    monkeypatch.setattr(sys, "argv", ["verifier_agreement.py", "--gsm8k", gsm8k, "--out", str(tmp_path)])
    verifier_agreement.main()
    result = json.loads((tmp_path / "verifier_agreement.json").read_text())
    assert result["gsm8k_train"] == {"cases": 4, "agree": 3, "both_accept": 3, "both_refuse": 0, "only_ours": 1,
                                     "only_math_verify": 0}
    assert [(r["ours"], r["math_verify"]) for r in result["math_style_cases"]] == [(True, False), (False, True)]
    report = (tmp_path / "verifier_agreement.md").read_text()
    assert "Math-Verify accepts a wrong answer" in report and "an earlier number is taken: 1" in report


# -----------------------------------------------------------------------------
# plot_run.py

def _metrics_dir(path, rows):
    path.mkdir()
    _write_jsonl(path / "metrics.jsonl", rows)
    return path


def test_plot_run_draws_each_runs_metrics_and_leaves_out_what_a_run_did_not_log(tmp_path, monkeypatch):
    """Two runs' metrics drawn on six panels: each line holds the run's own (step, value) points, the reward
    also smoothed, eval_mean_at_k and a key added later beside the greedy accuracy; a null metric (kl_distill of
    a --beta 0 run) and a missing one draw no line; a half-written last line is skipped."""
    pytest.importorskip("matplotlib", reason="plot_run.py needs matplotlib (pip install matplotlib)")
    import plot_run

    def rows(beta, evals):
        return [{"step": 0, **evals}] + [
            {"step": k, "reward_mean": k / 10 + beta, "kl_distill": 0.1 * k if beta else None, "kl_ref": 0.01 * k,
             "entropy": 2 - k / 10, "response_len": 10 + k, **(evals if k == 4 else {})} for k in range(1, 5)]
    sdpg_run = _metrics_dir(tmp_path / "sdpg", rows(0.5, {"eval_accuracy": 0.25, "eval_mean_at_k": 0.2,
                                                          "eval_teacher_accuracy": 0.75}))
    with open(sdpg_run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "rew')  # the run is still writing
    beta0 = _metrics_dir(tmp_path / "beta0", rows(0.0, {"eval_accuracy": 0.5}))
    out, figures, draw = tmp_path / "plot.png", [], plot_run.draw
    monkeypatch.setattr(plot_run, "draw", lambda runs, window: figures.append(draw(runs, window)) or figures[0])
    plot_run.main([str(sdpg_run), str(beta0), "--window", "2", "-o", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for ax in fig.axes
             for line in ax.get_lines()}
    assert len(fig.axes) == 6 and [t.get_text() for t in fig.legends[0].get_texts()] == [str(sdpg_run), str(beta0)]
    sdpg_run, beta0 = f"{sdpg_run} ", f"{beta0} "  # each line's label: the run's directory, then the key
    assert lines[sdpg_run + "reward_mean raw"] == ([1, 2, 3, 4], pytest.approx([0.6, 0.7, 0.8, 0.9]))
    assert lines[sdpg_run + "reward_mean"] == ([1, 2, 3, 4], pytest.approx([0.6, 0.65, 0.75, 0.85]))  # mean of 2
    assert lines[beta0 + "eval_accuracy"] == ([0, 4], [0.5, 0.5])
    assert lines[sdpg_run + "eval_mean_at_k"] == ([0, 4], [0.2, 0.2])
    assert lines[sdpg_run + "eval_teacher_accuracy"] == ([0, 4], [0.75, 0.75])
    assert lines[sdpg_run + "kl_distill"] == ([1, 2, 3, 4], pytest.approx([0.1, 0.2, 0.3, 0.4]))
    assert lines[beta0 + "kl_distill"] == ([], []) and lines[beta0 + "eval_mean_at_k"] == ([], [])
    for key in ("kl_ref", "entropy", "response_len"):
        assert lines[beta0 + key][0] == [1, 2, 3, 4]


def test_plot_run_without_metrics_gets_one_line_and_a_failing_exit(tmp_path):
    empty = _metrics_dir(tmp_path / "empty", [])
    for run_dir, message in ((tmp_path / "nothing", "error: no metrics.jsonl in "),
                             (empty, "metrics.jsonl has no rows yet")):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "plot_run.py"), str(run_dir)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert proc.returncode == 1 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc
        assert not (tmp_path / "run_plot.png").exists()


def test_plot_run_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    import plot_run

    run_dir = _metrics_dir(tmp_path / "run", [{"step": 0, "eval_accuracy": 0.5}])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="^error: plot_run.py needs matplotlib: pip install matplotlib$"):
        plot_run.main([str(run_dir), "-o", str(tmp_path / "p.png")])



# -----------------------------------------------------------------------------
# Self-distillation where the teacher knows more: the tiny model taught to read its prompt, the tasks of
# chosen difficulty, where the teacher's context comes from, who teaches, and the distillation estimators.

@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """The tiny reader of seed 0 with toy-reverse's file (80 held-out questions), made once as the study makes it."""
    path = str(tmp_path_factory.mktemp("reader") / "reader")
    record = tiny_reader.make_reader(0, path)
    model, tok = sdpg.load_model(path, 0)
    return model, tok, path, record["reading_steps"]


def _held_out_accuracy(model, tok, task, teacher_view=False):
    """Greedy accuracy on 100 fresh questions of a task (80 of toy-reverse's 112 held-out ones), the student's view
    or the teacher's."""
    if task == "toy":
        held_out = sdpg.toy_examples(100, seed=7)
    else:
        held_out = tiny_reader.reverse_examples(80, seed=7, held_out=True)
    args = sdpg.parse_args(["--model", "tiny", "--max-new-tokens", "2" if task == "toy" else "4"])
    right = sdpg.evaluate(model, tok, [tok.eos_token_id], held_out, args, teacher_view)
    return sum(right) / len(right)


def test_the_reader_reads_its_prompt_and_knows_no_task(reader):
    model, tok, _, steps = reader
    assert steps <= tiny_reader.READING_MAX_STEPS
    # chance: 1 in 10 for a digit; about 1 in 1,000 for three (binomial bounds at 100 and 80 questions)
    for task, chance_bound in (("toy", 0.2), ("toy-reverse", 0.05)):
        assert _held_out_accuracy(model, tok, task, True) >= 0.9, task  # the teacher's view reads the answer
        assert _held_out_accuracy(model, tok, task) <= chance_bound, task  # the student's view cannot
    # and it is the pretraining that reads: the same model untrained does not
    untrained = sdpg.build_tiny_model(tok, seed=0)
    assert _held_out_accuracy(untrained, tok, "toy-reverse", True) == 0.0


def test_reading_lessons_never_teach_a_task_and_the_pretraining_is_seeded():
    lessons = list(itertools.islice(tiny_reader.reading_lessons(seed=0), 20_000))
    for task in tiny_reader.TASKS.values():
        assert not any(ex["answer"] == task(ex["question"]) for ex in lessons)
    assert {len(ex["answer"]) for ex in lessons} == {1, 2, 3} and all(ex["solution"] == "" for ex in lessons)
    tok = sdpg.build_char_tokenizer()
    weights = []
    for seed in (0, 0, 1):
        model = sdpg.build_tiny_model(tok, seed=seed)
        assert tiny_reader.pretrain_to_read(model, tok, seed, max_steps=3) == 3
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert not torch.equal(weights[0], torch.cat([p.flatten() for p in sdpg.build_tiny_model(tok, 0).parameters()]))


def test_toy_reverse_and_its_held_out_questions(tmp_path):
    held_out = tiny_reader.reverse_examples(112, seed=0, held_out=True)
    train = tiny_reader.reverse_examples(500, seed=0, held_out=False)
    assert all(ex["answer"] == ex["question"][::-1] != ex["question"] for ex in train + held_out)
    assert {int(ex["question"]) % 8 for ex in held_out} == {0} and 0 not in {int(ex["question"]) % 8 for ex in train}
    assert len({ex["question"] for ex in held_out}) == 112
    with pytest.raises(SystemExit, match="toy-reverse holds out 112 questions"):
        tiny_reader.reverse_examples(113, seed=0, held_out=True)
    # as sdpg.py reads the task file: 5,000 training rows, then --eval-n held-out ones
    path = tiny_reader.task_file(str(tmp_path), seed=3, eval_n=80)
    train, held_out = sdpg.load_examples(path, 80, seed=3)
    assert train == tiny_reader.reverse_examples(5000, 3, False)
    assert held_out == tiny_reader.reverse_examples(80, 4, True)


def test_the_demo_runs_sdpg_on_the_reader_and_the_task(tmp_path, monkeypatch):
    """tiny_reader.py's command line: the reader of --seed and toy-reverse, the demo's settings, the user's flags
    after them (the last one given wins)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tiny_reader, "make_reader", lambda seed, path: os.makedirs(path, exist_ok=True))
    seen = []
    monkeypatch.setattr(sdpg, "main", seen.append)
    tiny_reader.main(["--beta", "0", "--seed", "2"])
    (argv,) = seen
    assert argv[:4] == ["--model", os.path.join("runs", "tiny-reader", "seed2"), "--dataset",
                        os.path.join("runs", "tiny-reader", "seed2", "toy-reverse-100.jsonl")]
    assert argv[4:-4] == tiny_reader.DEMO and argv[-4:] == ["--beta", "0", "--seed", "2"]


def test_each_teacher_context_builds_the_prompt_it_says():
    exs = [{"question": "11", "answer": "7", "solution": "s1"}, {"question": "22", "answer": "7", "solution": "s2"},
           {"question": "33", "answer": "3", "solution": "s3"}]
    completions = ["row0", "row1", "row2", "row3", "row4", "row5"]  # G = 2 answers per question
    correct = [True, False, False, False, True, True]
    ctx = lambda c: study_trainer.privileged_contexts(exs, c, 2, completions, correct)  # noqa: E731
    assert ctx("solution") == [("7", "s1")] * 2 + [("7", "s2")] * 2 + [("3", "s3")] * 2
    assert ctx("answer") == [("7", "")] * 2 + [("7", "")] * 2 + [("3", "")] * 2
    # the control: the next question whose answer differs, never the row's own answer
    assert ctx("other") == [("3", "s3")] * 2 + [("3", "s3")] * 2 + [("7", "s1")] * 2
    # peer: another right answer of the same group, never the row's own; none -> the answer alone
    assert ctx("peer") == [("7", ""), ("7", "row0"), ("7", ""), ("7", ""), ("3", "row5"), ("3", "row4")]
    rng = random.Random(0)
    for _ in range(200):
        batch = [{"question": "q", "answer": rng.choice("123"), "solution": "s"} for _ in range(rng.randint(1, 6))]
        for ex, (answer, _) in zip(batch, study_trainer.privileged_contexts(batch, "other")):
            assert answer != ex["answer"]
    # the teacher's prompt: the question, the line stating what the teacher is shown; an empty line left out
    texts = study_trainer.teacher_texts(exs, "", sdpg.TOY_TEACHER_TEMPLATE, ctx("peer"), 2)
    assert texts[1] == "11\nanswer: 7\nsolution: row0" and texts[0] == "11\nanswer: 7"
    same = [{"question": "q", "answer": "5", "solution": ""}] * 2
    assert study_trainer.teacher_texts(same, "", sdpg.TOY_TEACHER_TEMPLATE,
                                       study_trainer.privileged_contexts(same, "other")) == ["q"] * 2


def test_rollouts_and_evaluation_give_the_teacher_the_context_of_teacher_context(tiny):
    model, tok = tiny
    examples = tiny_reader.reverse_examples(3, seed=0, held_out=False)
    for context in ("solution", "other", "answer"):
        with _installed(["--teacher-context", context]) as (_, flags):
            args = sdpg.parse_args(["--model", "tiny", "--group-size", "2", "--max-new-tokens", "4", *flags])
            rb = sdpg.collect_rollouts(_models(model, tok), examples, args)
            seen = []
            with pytest.MonkeyPatch.context() as m:
                m.setattr(sdpg, "answer_and_grade", lambda model, tok, stop, texts, golds, *a: (seen.extend(
                    zip(texts, golds)), [None] * 4 + [torch.zeros(len(texts))])[1])
                sdpg.evaluate(model, tok, [tok.eos_token_id], examples, args, teacher_view=True)
        for row in range(6):
            text = tok.decode(rb.teacher_ids[row][rb.teacher_mask[row].bool()])
            own = examples[row // 2]["answer"]
            assert text.startswith(f"q: {examples[row // 2]['question']}\n") and text.endswith("\na: ")
            assert (f"answer: {own}\n" in text) == (context != "other")
        # the teacher's view in evaluation is shown the same context, and graded on the row's own answer
        assert [gold for _, gold in seen] == [ex["answer"] for ex in examples]
        shown_own = [f"answer: {ex['answer']}" in text for (text, _), ex in zip(seen, examples)]
        assert shown_own == [context != "other"] * 3
    assert sdpg.collect_rollouts.__module__ == "sdpg"  # put back


def test_a_teacher_template_file_replaces_the_teachers_prompt(tmp_path, tiny):
    model, tok = tiny
    (tmp_path / "t.txt").write_text("{question}\nthe answer is {answer}")
    with _installed(["--teacher-template", str(tmp_path / "t.txt")]) as (_, flags):
        args = sdpg.parse_args(["--model", "tiny", "--group-size", "2", *flags])
        rb = sdpg.collect_rollouts(_models(model, tok), sdpg.toy_examples(1, seed=0), args)
    ex = sdpg.toy_examples(1, seed=0)[0]
    teacher = tok.decode(rb.teacher_ids[0][rb.teacher_mask[0].bool()])
    assert teacher == f"q: {ex['question']}\nthe answer is {ex['answer']}\na: "
    with pytest.raises(SystemExit, match="no such template file"):
        study_trainer.install(study_trainer.parse(["--teacher-template", str(tmp_path / "missing.txt")])[0])


def test_estimators_are_zero_with_zero_gradient_when_the_teacher_is_the_student():
    torch.manual_seed(0)
    logits = torch.randn(5, 11)
    y = torch.randint(0, 11, (5,))
    for estimator in (sdpg.full_vocab_reverse_kl, lambda s, t: study_trainer.topk_reverse_kl(s, t, 3),
                      lambda s, t: study_trainer.sampled_reverse_kl(s, t, y)):
        s = logits.clone().requires_grad_(True)
        value = estimator(s, logits.clone())
        value.sum().backward()
        assert value.abs().max() < 1e-6 and s.grad.abs().max() < 1e-6


def _two_outcome_sets(p, q, k):
    """Reference for topk_reverse_kl: the K + 1 outcome distributions built by hand (the student's top-k
    tokens, then one 'any other' outcome) and their KL from torch.distributions."""
    top = p.topk(k).indices
    p_k = torch.cat([p[top], (1 - p[top].sum()).reshape(1)])
    q_k = torch.cat([q[top], (1 - q[top].sum()).reshape(1)])
    return p_k, q_k


def test_topk_estimator_is_a_kl_between_two_proper_distributions():
    torch.manual_seed(1)
    V = 9
    s, t = torch.randn(4, V) * 2, torch.randn(4, V) * 2
    full = sdpg.full_vocab_reverse_kl(s, t)
    torch.testing.assert_close(study_trainer.topk_reverse_kl(s, t, V), full, rtol=0, atol=0)  # K = V: exact
    for k in (1, 3, V - 1):
        value = study_trainer.topk_reverse_kl(s, t, k)
        for i in range(4):
            p_k, q_k = _two_outcome_sets(s[i].softmax(-1), t[i].softmax(-1), k)
            assert math.isclose(p_k.sum().item(), 1, abs_tol=1e-6) and math.isclose(q_k.sum().item(), 1, abs_tol=1e-6)
            ref = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=p_k),
                                                    torch.distributions.Categorical(probs=q_k))
            assert math.isclose(value[i].item(), ref.item(), rel_tol=1e-4, abs_tol=1e-6), (k, i)
        assert (value <= full + 1e-6).all()  # merging outcomes never raises a KL
    # its gradient is that of the hand-built KL (the top-k set itself carries none)
    s1 = s.clone().requires_grad_(True)
    study_trainer.topk_reverse_kl(s1, t, 3).sum().backward()
    s2 = s.clone().requires_grad_(True)
    p, q = s2.softmax(-1), t.softmax(-1)
    sum(torch.distributions.kl_divergence(*(torch.distributions.Categorical(probs=x) for x in _two_outcome_sets(
        p[i], q[i], 3))) for i in range(4)).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_sampled_estimator_is_unbiased_for_the_kl_and_its_gradient():
    """Monte Carlo over D draws y ~ p per position: the mean of the estimator's value is the exact KL and the
    mean of its gradient is the exact KL's gradient, each within 5 standard errors of the draws' mean."""
    torch.manual_seed(2)
    V, D = 6, 200_000
    s, t = torch.randn(3, V), torch.randn(3, V)
    y = torch.multinomial(s.softmax(-1), D, replacement=True)  # (3, D) draws from the student
    s1 = s.clone().requires_grad_(True)
    values = study_trainer.sampled_reverse_kl(s1[:, None, :].expand(3, D, V), t[:, None, :].expand(3, D, V), y)
    values.mean(dim=1).sum().backward()
    s2 = s.clone().requires_grad_(True)
    full = sdpg.full_vocab_reverse_kl(s2, t)
    full.sum().backward()
    se = values.detach().std(dim=1) / math.sqrt(D)
    assert ((values.detach().mean(dim=1) - full.detach()).abs() <= 5 * se).all()
    # the per-draw gradients in closed form, r (onehot(y) - p), for their standard error
    p = s.softmax(-1)
    per_draw = values.detach()[..., None] * (F.one_hot(y, V).float() - p[:, None, :])  # (3, D, V)
    torch.testing.assert_close(per_draw.mean(dim=1), s1.grad, rtol=1e-4, atol=1e-6)
    assert ((s1.grad - s2.grad).abs() <= 5 * per_draw.std(dim=1) / math.sqrt(D) + 1e-6).all()


def test_an_estimator_trains_with_its_gradient_and_logs_the_exact_kl(tiny):
    """With --distill-estimator the term's value is the exact KL (the logged kl_distill) and its gradient the
    estimator's: here 'topk' with K = 2 against a hand computation on the same logits."""
    model, tok = tiny
    args = sdpg.parse_args(["--model", "tiny", "--group-size", "4", "--max-new-tokens", "4", "--alpha", "0"])
    torch.manual_seed(3)
    rb = sdpg.collect_rollouts(_models(model, tok), sdpg.toy_examples(2, seed=3), args)
    exact = sdpg.score(_models(model, tok), rb, slice(0, 8), args, True, False)[1]
    with _installed(["--distill-estimator", "topk", "--distill-topk", "2"]):
        h = torch.randn(5, 64, requires_grad=True)
        ht = torch.randn(5, 64)
        y = torch.randint(0, 10, (5,))
        _, kl, _ = sdpg._chunk_terms(h, ht, y, model.lm_head, model.lm_head, 1.0)
        (g,) = torch.autograd.grad(kl.sum(), h)
        study = sdpg.score(_models(model, tok), rb, slice(0, 8), args, True, False)[1]
    student, teacher = model.lm_head(h), model.lm_head(ht).detach()
    torch.testing.assert_close(kl, sdpg.full_vocab_reverse_kl(student, teacher))  # the value: the exact KL
    (want,) = torch.autograd.grad(study_trainer.topk_reverse_kl(student, teacher, 2).sum(), h)
    torch.testing.assert_close(g, want)  # the gradient: the estimator's
    torch.testing.assert_close(study.detach(), exact.detach())  # the scored (and logged) KL is the exact one


def test_ema_teacher_moves_towards_the_policy_after_each_optimiser_step(tiny):
    model, tok = tiny
    ema = sdpg.frozen_copy(model, torch.float32)
    before = [p.clone() for p in ema.parameters()]
    with torch.no_grad():
        moved = sdpg.frozen_copy(model, torch.float32)
        for p in moved.parameters():
            p.add_(1.0)
    study_trainer.ema_update(ema, moved, 0.9)
    for b, e, m in zip(before, ema.parameters(), moved.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * m)
    # installed: the teacher is a float32 copy of the initial policy that each optimiser step moves
    with _installed(["--teacher", "ema", "--ema-rate", "0.5"]) as (_, flags):
        args = sdpg.parse_args(["--model", "tiny", "--alpha", "0", *flags])
        m = sdpg.build_models(args, torch.device("cpu"))
        assert m.teacher is not m.policy and m.teacher is not m.reference
        optimizer, _ = sdpg.build_optimizer(m.policy, args)
        start = [p.clone() for p in m.teacher.parameters()]
        for p in m.policy.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
    for s0, t, p in zip(start, m.teacher.parameters(), m.policy.parameters()):
        torch.testing.assert_close(t, 0.5 * s0 + 0.5 * p)


def _metrics(path):
    return _rows(os.path.join(path, "metrics.jsonl"))


def test_a_frozen_teacher_lifts_the_hard_task_where_the_verifier_alone_and_sdpgs_own_teacher_do_not(reader, tmp_path):
    """The mechanism the study found (README, the distillation at work), in seconds. On toy-reverse a right answer
    is about 1 draw in 1,000, so the verifier alone (--beta 0) learns nothing; the reader's frozen initial weights,
    shown the answer, teach it; SDPG's own teacher moves with the student and within 20 steps forgets how to read,
    its KL falling to about 0. Fails if the distillation's gradient is cut or the teacher is shown no answer."""
    _, _, path, _ = reader
    run = ["--model", path, "--dataset", tiny_reader.task_file(path, 0, 80), "--batch-prompts", "16", "--lr", "3e-3",
           "--alpha", "0.05", "--micro-batch", "128", "--max-new-tokens", "4", "--eval-n", "80", "--save-every", "0",
           "--beta-warmup", "0", "--beta-decay", "0"]
    distil = ["--beta", "1", "--no-gate", "--steps", "80", "--eval-every", "0"]
    sdpg.main(run + ["--beta", "0", "--steps", "80", "--eval-every", "0", "--output-dir", str(tmp_path / "grpo")])
    sdpg.main(run + distil + ["--teacher", "reference", "--output-dir", str(tmp_path / "reference")])
    sdpg.main(run + ["--beta", "1", "--no-gate", "--steps", "20", "--eval-every", "20",
                     "--output-dir", str(tmp_path / "policy")])
    grpo, reference, policy = (_metrics(tmp_path / name) for name in ("grpo", "reference", "policy"))
    assert grpo[-1]["eval_accuracy"] == 0.0 and "eval_teacher_accuracy" not in grpo[-1]
    assert reference[0]["eval_accuracy"] == 0.0 and reference[-1]["eval_accuracy"] >= 0.04
    assert reference[-1]["eval_teacher_accuracy"] >= 0.9  # a frozen teacher keeps what it knows
    assert reference[-1]["kl_distill"] < 0.5 * reference[1]["kl_distill"]
    assert policy[0]["eval_teacher_accuracy"] >= 0.9 and policy[-1]["eval_teacher_accuracy"] <= 0.2
    assert policy[-1]["kl_distill"] < 0.1 * policy[1]["kl_distill"] and policy[-1]["eval_accuracy"] == 0.0
