"""Tests of data/prepare.py: each layout it knows becomes sdpg.py's {question, answer, solution} rows. No network:
Hub datasets are stood in for."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]
import prepare  # noqa: E402
import sdpg  # noqa: E402


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prepared(tmp_path, source, *flags):
    out = tmp_path / "out.jsonl"
    prepare.main([source, str(out), *flags])
    return [json.loads(line) for line in open(out)]


LAYOUTS = {  # name: (one row, what it becomes, field flags)
    "gsm8k": ({"question": "How many?", "answer": "Add 2 and 3: <<2+3=5>>5 pens.\n#### 5"},
              {"question": "How many?", "answer": "5", "solution": "Add 2 and 3: 5 pens."}, []),
    "math": ({"problem": "Find x.", "solution": "So $x = \\boxed{\\frac{1}{2}}$.", "level": "Level 2"},
             {"question": "Find x.", "answer": "\\frac{1}{2}", "solution": "So $x = \\boxed{\\frac{1}{2}}$."}, []),
    "math-500": ({"problem": "Find y.", "solution": "Then $y = \\boxed{7}$.", "answer": "7"},
                 {"question": "Find y.", "answer": "7", "solution": "Then $y = \\boxed{7}$."}, []),
    "problem-answer": ({"problem": "Find z.", "answer": 12},
                       {"question": "Find z.", "answer": "12", "solution": ""}, []),
    "dapo-math-17k": ({"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": "a1"},
                       "prompt": [{"role": "system", "content": "Be careful."},
                                  {"role": "user", "content": "Solve it. What is 30 + 4?"}],
                       "reward_model": {"ground_truth": "34", "style": "rule"}},
                      {"question": "Solve it. What is 30 + 4?", "answer": "34", "solution": ""}, []),
    # open-r1's processed copy: the prompt as text and a 'solution' column that is only the answer
    "dapo-processed": ({"prompt": "What is 30 + 4?", "solution": "34",
                        "reward_model": {"ground_truth": "34", "style": "rule"}},
                       {"question": "What is 30 + 4?", "answer": "34", "solution": ""}, []),
    "flags": ({"input": {"text": "What is 4 + 5?"}, "target": "9", "work": "4 + 5 = 9"},
              {"question": "What is 4 + 5?", "answer": "9", "solution": "4 + 5 = 9"},
              ["--question-field", "input.text", "--answer-field", "target", "--solution-field", "work"]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_each_dataset_layout_becomes_the_rows_sdpg_reads(name, tmp_path):
    row, expected, flags = LAYOUTS[name]
    rows = _prepared(tmp_path, _write_jsonl(tmp_path / "d.jsonl", [row] * 3), *flags)
    assert rows == [expected] * 3
    train, held_out = sdpg.load_examples(str(tmp_path / "out.jsonl"), eval_n=1, seed=0)  # and sdpg.py reads them
    assert train == [expected, expected] and held_out == [expected]


def test_a_hub_dataset_puts_its_test_rows_last_and_one_without_keeps_its_order(monkeypatch, tmp_path, capsys):
    """A Hub id with train and test splits is written train first, then the first --eval-n test rows (which
    sdpg.py holds out with that --eval-n); one with only a train split (DAPO-Math-17k) keeps its order.
    load_dataset is stood in for: no network."""
    import datasets

    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(5)]
    hub = {"only-train": datasets.DatasetDict(train=datasets.Dataset.from_list(rows)),
           "both": datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:3]),
                                        test=datasets.Dataset.from_list(rows[3:])),
           "no-train": datasets.DatasetDict(validation=datasets.Dataset.from_list(rows))}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None, **kw: hub[name])
    assert [r["answer"] for r in _prepared(tmp_path, "only-train")] == ["1", "2", "3", "4", "5"]
    assert [r["answer"] for r in _prepared(tmp_path, "both", "--eval-n", "1")] == ["1", "2", "3", "4"]
    assert "the last 1 from the test split: train with --eval-n 1" in capsys.readouterr().out
    assert [r["answer"] for r in _prepared(tmp_path, "no-train", "--split", "validation")] == ["1", "2", "3", "4", "5"]
    with pytest.raises(SystemExit, match="has no train split"):
        _prepared(tmp_path, "no-train")


def test_parquet_and_unknown_layouts_get_one_line(tmp_path):
    import datasets

    row, expected, _ = LAYOUTS["dapo-math-17k"]
    datasets.Dataset.from_list([row] * 3).to_parquet(str(tmp_path / "d.parquet"))
    assert _prepared(tmp_path, str(tmp_path / "d.parquet")) == [expected] * 3
    path = _write_jsonl(tmp_path / "odd.jsonl", [{"input": "What is 4 + 5?", "target": "9"}] * 3)
    with pytest.raises(SystemExit, match=r"matches no known layout \(its fields: input, target\)") as e:
        _prepared(tmp_path, path)
    assert "\n" not in str(e.value.code)
    with pytest.raises(SystemExit, match="has no 'answer' field"):
        _prepared(tmp_path, path, "--question-field", "input")
    assert _prepared(tmp_path, path, "--question-field", "input", "--answer-field", "target")[0] == {
        "question": "What is 4 + 5?", "answer": "9", "solution": ""}
    with pytest.raises(SystemExit, match="no such file"):
        _prepared(tmp_path, str(tmp_path / "missing.jsonl"))


def test_a_multi_turn_chat_prompt_gives_its_last_user_message():
    """A few-shot chat prompt (system, worked example, its answer, then the question) trains on its last user
    message. Guards against reading the first user message, which would train every row on the example."""
    chat = [{"role": "system", "content": "Solve the problem."}, {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "What is 2 + 3?"}]
    row = {"prompt": chat, "reward_model": {"ground_truth": "5"}}
    assert prepare.normalise_row(row, "row 0") == {"question": "What is 2 + 3?", "answer": "5", "solution": ""}


def test_the_command_line_runs_offline_on_a_file(tmp_path):
    source = _write_jsonl(tmp_path / "d.jsonl", [LAYOUTS["math"][0]] * 2)
    done = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), source, str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "wrote 2 rows" in done.stdout, done.stderr[-2000:]


def test_doctests():
    import doctest
    result = doctest.testmod(prepare)
    assert result.attempted > 0 and result.failed == 0
