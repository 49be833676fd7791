"""sdpg.py on a tiny model that can read its prompt, and a task it cannot solve: the distillation at work.

The tiny model of `python sdpg.py --model tiny` cannot read: trained from scratch, its teacher view (the prompt
with the answer in it) knows no more than its student view, so the distillation has nothing to pass on. Here it
is first taught the one skill every pretrained model has: repeating an answer that its prompt states, on lessons
of random digits whose answer is never what a task below gives for the question (it learns to read, never a task).
Then sdpg.py trains it on 'toy-reverse': reverse a 3-digit number, right once in 1,000 draws by chance, held out
on the multiples of 8. Every sdpg.py flag works; the defaults are beta 1, no gate, constant beta:

    python benchmarks/tiny_reader.py --beta 0 --output-dir runs/alone            # the verifier alone
    python benchmarks/tiny_reader.py --teacher reference --output-dir runs/frozen  # the frozen initial model teaches
    python benchmarks/tiny_reader.py --output-dir runs/policy                     # SDPG's own teacher

The reader of a seed is pretrained once (10 to 40 s on a CPU) into runs/tiny-reader/seedS, with the task file.
"""

import itertools
import json
import os
import random
import string
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdpg  # noqa: E402

READING_BATCH, READING_LR, READING_MAX_STEPS, READING_TARGET = 64, 3e-3, 2000, 0.99
TASKS = {"toy": lambda question: question[1:2], "toy-reverse": lambda question: question[::-1]}  # their answers
DEMO = ["--max-new-tokens", "4", "--beta", "1", "--no-gate", "--beta-warmup", "0", "--beta-decay", "0"]


def reading_lessons(seed: int):
    """An endless stream of lessons {question, answer, solution}, the same for the same seed: a random 2- or
    3-digit question, a random 1- to 3-digit answer that no task in TASKS gives for it, no solution."""
    rng = random.Random(seed)
    while True:
        question = "".join(rng.choices(string.digits, k=rng.choice((2, 3))))
        answer = "".join(rng.choices(string.digits, k=rng.choice((1, 2, 3))))
        if all(answer != task(question) for task in TASKS.values()) and answer != question:
            yield {"question": question, "answer": answer, "solution": ""}


def pretrain_to_read(model, tokenizer, seed: int, max_steps: int = READING_MAX_STEPS) -> int:
    """Teaches the tiny model to repeat the answer that its teacher prompt (sdpg.TOY_TEACHER_TEMPLATE) states, on the
    CPU, the same weights for the same seed: the answer and EOS are learned, the prompt is not. Stops once greedy
    answers to 128 probe lessons are READING_TARGET right (checked every 100 steps). Returns the steps taken."""
    def teacher_prompt(ex: dict) -> list[int]:
        return sdpg.encode_prompt(tokenizer, sdpg.prompt_texts(ex, "", sdpg.TOY_TEMPLATES)[1])

    probe = list(itertools.islice(reading_lessons(seed + 10_000), 128))
    probe_ids, probe_mask = sdpg.left_pad([teacher_prompt(ex) for ex in probe], tokenizer.pad_token_id,
                                          torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=READING_LR, weight_decay=0.0)
    lessons = reading_lessons(seed)
    for step in range(1, max_steps + 1):
        model.train()
        rows, labels = [], []
        for ex in itertools.islice(lessons, READING_BATCH):
            prompt = teacher_prompt(ex)
            target = tokenizer(ex["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            rows.append(prompt + target)
            labels.append([-100] * len(prompt) + target)  # -100: not learned
        T = max(len(r) for r in rows)  # right-padded to T
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (T - len(r)) for r in rows])  # (B, T)
        mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])  # (B, T)
        label_ids = torch.tensor([y + [-100] * (T - len(y)) for y in labels])  # (B, T)
        model(input_ids=ids, attention_mask=mask, labels=label_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            model.eval()
            resp, resp_mask = sdpg.generate(model, probe_ids, probe_mask, 4, 0.0, 1.0, [tokenizer.eos_token_id],
                                            tokenizer.pad_token_id)
            said = sdpg.decode_responses(tokenizer, resp, resp_mask)
            if sum(s.strip() == ex["answer"] for s, ex in zip(said, probe)) >= READING_TARGET * len(probe):
                break
    model.eval()
    return step


def reverse_examples(n: int, seed: int, held_out: bool) -> list[dict]:
    """'toy-reverse': a 3-digit number reversed ('472' -> '274'); no palindromes (copying would answer them). The
    multiples of 8 (112 numbers) are held out and the other 788 train, so that evaluation asks what never trained;
    training rows are drawn with replacement, held-out ones without (n <= 112)."""
    rng = random.Random(seed)
    numbers = [f"{i:03d}" for i in range(1000) if (i % 8 == 0) == held_out and f"{i:03d}" != f"{i:03d}"[::-1]]
    if held_out and n > len(numbers):
        raise SystemExit(f"error: toy-reverse holds out {len(numbers)} questions; --eval-n {n} asks for more")
    questions = rng.sample(numbers, n) if held_out else rng.choices(numbers, k=n)
    return [{"question": q, "answer": q[::-1], "solution": ""} for q in questions]


def task_file(folder: str, seed: int, eval_n: int) -> str:
    """toy-reverse as sdpg.py reads a local file: 5,000 training rows, then eval_n held-out ones (its last --eval-n);
    written once into folder/toy-reverse-EVAL_N.jsonl. Returns its path."""
    path = os.path.join(folder, f"toy-reverse-{eval_n}.jsonl")
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        rows = reverse_examples(5000, seed, held_out=False) + reverse_examples(eval_n, seed + 1, held_out=True)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    return path


def make_reader(seed: int, path: str) -> dict:
    """Pretrains the reader of one seed into `path` (kept if it is there already); returns its record."""
    record_path = os.path.join(path, "reading.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)
    import time
    t0 = time.time()
    tokenizer = sdpg.build_char_tokenizer()
    model = sdpg.build_tiny_model(tokenizer, seed)
    record = {"seed": seed, "reading_steps": pretrain_to_read(model, tokenizer, seed)}
    record["reading_s"] = round(time.time() - t0, 1)
    sdpg.save_checkpoint(model, tokenizer, path)
    with open(record_path, "w") as f:
        json.dump(record, f)
    return record


def main(argv: list[str]) -> None:
    """sdpg.py on the reader of --seed and toy-reverse, with the DEMO settings under the flags given."""
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else 0
    eval_n = int(argv[argv.index("--eval-n") + 1]) if "--eval-n" in argv else 100
    folder = os.path.join("runs", "tiny-reader", f"seed{seed}")
    make_reader(seed, folder)
    sdpg.main(["--model", folder, "--dataset", task_file(folder, seed, eval_n), *DEMO, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
