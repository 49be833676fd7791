"""Tests of the SmolLM2 teacher study's pieces that need no model: its tasks (prepare_smollm2.py) and its
summary (smollm2_teacher_study.py). CPU only, no network, no training."""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import prepare_smollm2  # noqa: E402
import sdpg  # noqa: E402
import smollm2_teacher_study as study  # noqa: E402
from verifiers import math_reward  # noqa: E402


@pytest.mark.parametrize("task", list(prepare_smollm2.TASKS))
def test_the_teacher_prompt_holds_the_answer_and_the_student_prompt_never_does(task):
    make, pairs, _ = prepare_smollm2.TASKS[task]
    for row in map(lambda pair: make(*pair), pairs):  # every question the task can ask
        student, teacher = sdpg.prompt_texts(row, study.INSTRUCTION)
        numbers = re.findall(r"\d+(?:\.\d+)?", student)
        assert row["answer"] not in numbers and row["answer"] in re.findall(r"\d+(?:\.\d+)?", teacher)
        assert math_reward(row["solution"], row["answer"]) == 1.0  # the solution ends in the answer


@pytest.mark.parametrize("task", list(prepare_smollm2.TASKS))
def test_held_out_questions_never_occur_in_training(task):
    rows = prepare_smollm2.task_rows(task, 2000, seed=0)
    train, held = rows[:2000], rows[2000:]
    assert len(held) == prepare_smollm2.HELD_OUT == len({r["question"] for r in held})  # no repeats
    operands = lambda r: tuple(sorted(map(int, re.findall(r"\d+", r["question"]))))  # noqa: E731
    # multiplication is symmetric: "43 times 37" must not be trained when "37 times 43" is held out
    key = operands if task == "multiply" else (lambda r: r["question"])
    assert not {key(r) for r in held} & {key(r) for r in train}
    assert prepare_smollm2.task_rows(task, 2000, seed=0) == rows  # the same file from the same seed


@pytest.mark.parametrize("said, gold, reward", [
    ("37 times 43 is 1,591.", "1591", 1.0),  # the thousands separator the model writes
    ("The answer is 1591.", "1591", 1.0),
    ("So 37 * 43 = 1591", "1591", 1.0),
    ("37 times 43 is 1,590.", "1591", 0.0),
    ("37 times 43 is 159.", "1591", 0.0),
    ("37 divided by 8 is 4.625.", "4.625", 1.0),
    ("The result is 4.63.", "4.625", 0.0),  # no tolerance: a rounded answer is wrong
    ("It is 4.6250", "4.625", 1.0),
])
def test_the_verifier_reads_the_forms_the_model_writes(said, gold, reward):
    assert math_reward(said, gold) == reward


def _rows(evals: list[tuple[int, float, float | None]], kl: float | None, steps: int = 20) -> list[dict]:
    """A fabricated metrics file: one row per training step, evaluations at the given steps."""
    rows = []
    for step in range(steps + 1):
        row = {"step": step}
        if step:
            row.update(reward_mean=0.1 * (step % 2), kl_distill=kl, kl_ref=0.5, entropy=1.0, time_s=2.0)
        ev = next((e for e in evals if e[0] == step), None)
        if ev:
            row.update(eval_accuracy=ev[1], **({} if ev[2] is None else {"eval_teacher_accuracy": ev[2]}))
        rows.append(row)
    return rows


def test_the_summary_writes_the_means_and_ranges_a_hand_computation_gives():
    runs = {"beta1-nogate": [_rows([(0, 0.02, 0.80), (10, 0.00, 0.10), (20, 0.04, 0.00)], kl=0.3),
                             _rows([(0, 0.04, 0.90), (10, 0.00, 0.30), (20, 0.02, 0.20)], kl=0.5),
                             _rows([(0, 0.09, 0.70), (10, 0.01, 0.20), (20, 0.00, 0.60)], kl=1.0)],
            "beta0": [_rows([(0, 0.03, None), (20, 0.05, None)], kl=None)]}
    results = {name: [{"seed": s, **study.run_summary(rows)} for s, rows in enumerate(v)] for name, v in runs.items()}
    first = results["beta1-nogate"][0]
    assert (first["student_before"], first["student_final"], first["student_best"]) == (0.02, 0.04, 0.04)
    assert (first["teacher_before"], first["teacher_final"]) == (0.80, 0.00)
    assert first["reward_mean"] == pytest.approx(0.05) and first["run_s"] == 40 and first["steps"] == 20
    assert first["kl_distill_last10"] == pytest.approx(0.3) and results["beta0"][0]["kl_distill_last10"] is None
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in study.table(results).splitlines()
            if line.startswith("| beta")}
    # by hand: student before (0.02 + 0.04 + 0.09) / 3 = 0.05, final 0.02, best (0.04 + 0.04 + 0.09) / 3 = 0.057;
    # teacher view before 0.80, final (0.00 + 0.20 + 0.60) / 3 = 0.267; kl_distill (0.3 + 0.5 + 1.0) / 3 = 0.6
    assert rows["beta1-nogate"][1:8] == ["0, 1, 2", "0.05 (0.02-0.09)", "0.02 (0.00-0.04)", "0.06 (0.04-0.09)",
                                         "0.80 (0.70-0.90)", "0.27 (0.00-0.60)", "0.050 (0.050-0.050)"]
    assert rows["beta1-nogate"][8] == "0.60 (0.30-1.00)"
    assert rows["beta0"][5] == "-" and rows["beta0"][2] == "0.03 (0.03-0.03)"  # no teacher view without a teacher
    steps = {tuple(line.split(" | ")[:2]): line.split(" | ")[2:] for line in study.by_step(results).splitlines()}
    # by hand, the teacher view at step 10: (0.10 + 0.30 + 0.20) / 3 = 0.20; beta0 was not evaluated at step 10
    assert steps[("| beta1-nogate", "teacher")][1] == "0.20 (0.10-0.30)"
    assert steps[("| beta0", "student")][:3] == ["0.03 (0.03-0.03)", "-", "0.05 (0.05-0.05) |"]
    assert ("| beta0", "teacher") not in steps


def test_each_variant_is_one_command_and_a_finished_run_is_reused(tmp_path):
    cmd = study.command("beta1-nogate-plain", 2, 40, "runs/x")
    assert cmd[0] == "benchmarks/study_trainer.py" and cmd[cmd.index("--teacher-template") + 1] == os.path.join(
        "runs/x", "plain_template.txt")
    assert study.command("beta1-nogate-reference", 2, 40, "runs/x")[0] == "sdpg.py"
    parsed = sdpg.parse_args(study.command("beta1-nogate-reference", 2, 40, "runs/x")[1:])
    assert (parsed.beta, parsed.gate, parsed.teacher, parsed.steps, parsed.seed) == (1.0, False, "reference", 40, 2)
    assert parsed.output_dir == os.path.join("runs/x", "beta1-nogate-reference", "seed2")
    record = tmp_path / "r.json"
    rows = _rows([(0, 0.0, 1.0), (20, 0.0, 0.5)], kl=0.1)
    record.write_text(json.dumps({"command": cmd, "rows": rows}))
    assert study.run(cmd, str(record), None) == rows  # no process is started: the record is the run
    with pytest.raises(SystemExit, match="made by another command"):
        study.run(study.command("beta1-nogate-plain", 3, 40, "runs/x"), str(record), None)


def test_a_run_stopped_by_a_signal_leaves_no_record_and_a_finished_one_does(tmp_path, monkeypatch):
    # sdpg.py exits 0 after SIGTERM too (it saves a checkpoint): only final/ tells a finished run from a stopped one
    cmd, rows = study.command("beta0", 0, 20, "runs/x"), _rows([(0, 0.0, None), (20, 0.1, None)], kl=0.0)
    out = tmp_path / "runs/x/beta0/seed0"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "checkpoint-10").mkdir()
    monkeypatch.setattr(study, "ROOT", str(tmp_path))
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    record = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="stopped before the end"):
        study.run(cmd, str(record), None)
    assert not record.exists() and (out / "checkpoint-10").is_dir()
    (out / "final").mkdir()
    assert study.run(cmd, str(record), None) == rows
    assert json.loads(record.read_text()) == {"command": cmd, "rows": rows} and not (out / "checkpoint-10").exists()


def test_once_a_run_stops_no_other_run_starts_and_the_stop_is_what_is_raised():
    started, b_running = [], threading.Event()

    def task(name):
        def go():
            started.append(name)
            b_running.set()
            time.sleep(0.3)  # still running when the other one stops
            return name
        return go

    def stops():
        b_running.wait(5)
        started.append("a")
        raise SystemExit("stopped before the end: a")

    with pytest.raises(SystemExit, match="stopped before the end: a"):
        study.run_all({"a": stops, "b": task("b"), "c": task("c"), "d": task("d")}, jobs=2)
    assert sorted(started) == ["a", "b"]  # b ran to its end; c and d wait for the next sitting
    assert study.run_all({k: task(k) for k in "xyz"}, jobs=2) == {"x": "x", "y": "y", "z": "z"}


def test_view_accuracy_asks_the_given_prompt_in_batches_of_16_and_averages_the_verdicts(monkeypatch):
    model, tokenizer = sdpg.load_model("tiny", 0)
    examples = sdpg.load_examples("toy", 0, 0)[0][:20]
    asked = []

    def answer_and_grade(model, tokenizer, stop, texts, golds, max_new_tokens, temperature):  # right if it was told
        asked.append((list(texts), max_new_tokens, temperature))
        right = [float(f"is {gold}." in text) for text, gold in zip(texts, golds)]
        return None, None, list(texts), None, torch.tensor(right)  # the prompts stand in for the answers

    monkeypatch.setattr(sdpg, "answer_and_grade", answer_and_grade)
    monkeypatch.setattr(sdpg, "decode_responses", lambda tok, texts, mask: texts)
    template = "{question}\n{instruction}\nThe answer is {answer}."
    assert study.view_accuracy(model, tokenizer, examples, template, 7) == 1.0
    assert [len(texts) for texts, _, _ in asked] == [16, 4] and {(n, t) for _, n, t in asked} == {(7, 0.0)}
    assert sum((texts for texts, _, _ in asked), []) == [
        f"{ex['question']}\n{study.INSTRUCTION}\nThe answer is {ex['answer']}." for ex in examples]
    assert study.view_accuracy(model, tokenizer, examples, "{question}", 7) == 0.0


def test_the_after_table_writes_one_row_a_run_with_its_answers_on_one_line():
    found = {"question": "What is 33 times 79?", "runs": {"beta1-nogate-seed1": {
        "prompt": "teacher, plain prompt", "accuracy": 0.874, "answers": {
            "student": "1 | 2", "teacher, sdpg.py's prompt": "Final answer: 2607\nFinal",
            "teacher, plain prompt": "x"}}}}
    lines = study.after_table(found).splitlines()
    assert '"What is 33 times 79?"' in lines[0]
    assert lines[-1] == r"| beta1-nogate-seed1 | plain prompt | 0.87 | 1 \| 2 | Final answer: 2607\nFinal | x |"
    assert lines[-1].count(" | ") == lines[-3].count(" | ")  # as many cells as the header


@pytest.mark.parametrize("said, gold, stated", [
    ("The answer is 33 * 79.", "2607", False),  # right by the verifier, no multiplication done
    ("33 * 79 = 2,607.", "2607", True), ("The answer is 2607.", "2607", True),
    ("The answer is 26070.", "2607", False), ("2607.5", "2607", False), ("4.625", "4.625", True)])
def test_states_the_number_wants_the_gold_number_itself(said, gold, stated):
    assert study.states_the_number(said, gold) is stated


def test_stated_counts_right_and_stated_answers_per_run_and_view(tmp_path, monkeypatch):
    examples = [{"question": f"What is {i} times 2?", "answer": str(2 * i), "solution": f"{i} * 2 = {2 * i}."}
                for i in range(120)]
    (tmp_path / "runs/smollm2").mkdir(parents=True)
    (tmp_path / "runs/smollm2/multiply.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    results = tmp_path / "results"
    for variant in ("beta0", "beta1-nogate", "beta1-nogate-plain"):
        (tmp_path / "out" / variant / "seed0" / "final").mkdir(parents=True)
        (results / "runs").mkdir(parents=True, exist_ok=True)
        rows = _rows([(0, 0.0, 0.5), (60, 0.3, 0.1)], kl=0.1, steps=60)
        (results / "runs" / f"{variant}-seed0.json").write_text(json.dumps({"command": [], "rows": rows}))
    (tmp_path / "out/beta1-nogate-reference/seed1/final").mkdir(parents=True)  # no record: not finished
    monkeypatch.setattr(study, "ROOT", str(tmp_path))
    asked = []

    def answers(model, tokenizer, held_out, template):  # 100 questions: 30 right, 10 of them without the number
        asked.append((model, template))
        assert held_out == examples[20:]  # the held-out 100, as in the runs
        return [{"answer": f"a{i}", "right": i < 30, "stated": i < 20} for i in range(100)]

    monkeypatch.setattr(study, "graded_answers", answers)
    found = study.stated("out", str(results), [0, 1], load=lambda path: (os.path.relpath(path, tmp_path), None))
    assert list(found) == ["untrained", "beta0-seed0", "beta1-nogate-seed0", "beta1-nogate-plain-seed0"]
    assert asked == [("runs/smollm2/model", sdpg.STUDENT_TEMPLATE), ("runs/smollm2/model", sdpg.TEACHER_TEMPLATE),
                     ("out/beta0/seed0/final", sdpg.STUDENT_TEMPLATE),  # no teacher of its own
                     ("out/beta1-nogate/seed0/final", sdpg.STUDENT_TEMPLATE),
                     ("out/beta1-nogate/seed0/final", sdpg.TEACHER_TEMPLATE),
                     ("out/beta1-nogate-plain/seed0/final", sdpg.STUDENT_TEMPLATE),
                     ("out/beta1-nogate-plain/seed0/final", study.PLAIN_TEMPLATE)]  # the prompt it trained with
    view = found["beta1-nogate-seed0"]["teacher"]
    assert (view["right"], view["stated"], view["logged"], view["unstated_example"], view["wrong_example"]) == (
        0.3, 0.2, 0.1, "a20", "a30")
    assert found["untrained"]["student"]["logged"] is None and found["beta0-seed0"]["student"]["logged"] == 0.3
    lines = study.stated_table(found).splitlines()
    assert lines[-2] == "| beta1-nogate-seed0 | 0.30 / 0.20 | 0.30 / 0.20 (logged 0.10) | a20 | a30 |"  # logged differs
    assert lines[-3] == "| beta0-seed0 | 0.30 / 0.20 | - | a20 | a30 |"
    # a second sitting grades only what is new, and keeps the order of VARIANTS
    (results / "runs" / "beta1-nogate-reference-seed1.json").write_text(json.dumps({"command": [], "rows": rows}))
    asked.clear()
    again = study.stated("out", str(results), [0, 1], load=lambda path: (os.path.relpath(path, tmp_path), None))
    assert asked == [("out/beta1-nogate-reference/seed1/final", sdpg.STUDENT_TEMPLATE)]  # the teacher is frozen
    assert list(again) == [*list(found)[:3], "beta1-nogate-reference-seed1", "beta1-nogate-plain-seed0"]
    assert {k: again[k] for k in found} == found


def test_graded_answers_asks_in_batches_of_16_and_grades_each_answer(monkeypatch):
    examples = [{"question": f"What is {i} times 3?", "answer": str(3 * i), "solution": ""} for i in range(10, 30)]
    said = {ex["question"]: s for ex, s in zip(examples, ["The answer is 10 * 3.", "33", "It is 36.", "39, or 40."]
                                                    + ["no"] * 16)}  # the 4th is wrong, though it writes 39
    asked = []

    def answer_and_grade(model, tokenizer, stop, texts, golds, max_new_tokens, temperature):
        asked.append((len(texts), max_new_tokens, temperature))
        return None, None, list(texts), None, torch.tensor([float(i < 3) for i in range(len(texts))])

    monkeypatch.setattr(sdpg, "answer_and_grade", answer_and_grade)
    monkeypatch.setattr(sdpg, "stop_token_ids", lambda model, tokenizer: [])
    monkeypatch.setattr(sdpg, "decode_responses", lambda tok, texts, mask: [said[t.split("\n")[0]] for t in texts])
    graded = study.graded_answers(None, None, examples, "{question}\n{instruction}")
    assert asked == [(16, 24, 0.0), (4, 24, 0.0)]
    assert [(g["right"], g["stated"]) for g in graded[:4]] == [(True, False), (True, True), (True, True), (False,
                                                                                                         False)]
    assert [g["answer"] for g in graded[:3]] == ["The answer is 10 * 3.", "33", "It is 36."]
    assert [(g["right"], g["stated"]) for g in graded[16:19]] == [(True, False)] * 3  # right, but "no" number
