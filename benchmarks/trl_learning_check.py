"""Does the TRL bridge distil as sdpg.py does? The tiny reader on toy-reverse, trained inside TRL's GRPOTrainer.

The same task and readers as benchmarks/distill_study.py (a 2-layer model first taught to read its prompt; reverse
a 3-digit number, about 1 draw in 1,000 right at the start), trained by integrations/trl_sdpg.py's SDPGTrainer
with the study's settings where TRL has them: 16 questions x 8 answers, lr 3e-3 (constant after 10 warm-up steps),
weight decay 0.1, anchor 0.05 (TRL's k3; sdpg.py's study used urkl), 200 steps, greedy accuracy on 80 held-out
questions every 20 steps, of the student's view and of the policy's teacher view. Variants: TRL alone
(distill_beta 0), the frozen reader teaches (beta 1, no gate), the policy teaches (beta 1, no gate).

    pip install -r integrations/requirements.txt
    python benchmarks/trl_learning_check.py                       # seeds 0-4, about 15 min on 2 cores
    python benchmarks/trl_learning_check.py --seeds 0 --steps 40  # a look

Writes RESULTS/summary.json and summary.md: per variant and seed, the accuracy at each evaluation.
"""

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integrations"))

VARIANTS = {
    "trl-only": dict(distill_beta=0.0),
    "teacher-reference": dict(distill_beta=1.0, distill_gate=False, distill_teacher="reference"),
    "teacher-policy": dict(distill_beta=1.0, distill_gate=False, distill_teacher="policy"),
}
CHAT_TEMPLATE = "q: {{ messages[-1]['content'] }}\na: "  # the reader's own prompt format (sdpg.encode_prompt)


def reader(seed: int, path: str):
    """The tiny model of this seed taught to read (the distillation study's reader), pretrained into `path` unless
    it is there, and loaded from there: TRL builds its reference model from the policy's own path."""
    import sdpg
    import tiny_reader
    tiny_reader.make_reader(seed, path)
    model, tokenizer = sdpg.load_model(path, seed)
    tokenizer.chat_template = CHAT_TEMPLATE
    return model, tokenizer


def one_run(variant: str, seed: int, steps: int, eval_every: int, out: str, reader_dir: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    import sdpg
    import tiny_reader
    from trl_sdpg import SDPGConfig, SDPGTrainer, verifier_reward

    model, tokenizer = reader(seed, reader_dir)
    train = tiny_reader.reverse_examples(16 * steps, seed, held_out=False)
    held_out = tiny_reader.reverse_examples(80, seed + 1, held_out=True)
    eval_args = sdpg.parse_args(["--model", "tiny", "--max-new-tokens", "4", "--batch-prompts", "16"])
    rows = [{"prompt": [{"role": "user", "content": ex["question"]}], "answer": ex["answer"], "solution": ""}
            for ex in train]

    def accuracy(m, teacher_view=False) -> float:
        """Greedy accuracy of m on the held-out questions, on the student's prompt or the teacher's."""
        was_training = m.training
        right = sdpg.evaluate(m, tokenizer, [tokenizer.eos_token_id], held_out, eval_args, teacher_view)
        m.train(was_training)
        return sum(right) / len(right)

    def evaluation(step: int, m) -> dict:  # the policy's teacher view: what teaches in teacher-policy
        return {"step": step, "accuracy": accuracy(m), "policy_teacher_view": accuracy(m, True)}

    evals = [evaluation(0, model)]

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every == 0:
                evals.append(evaluation(state.global_step, model))

    config = SDPGConfig(output_dir=out, use_cpu=True, seed=seed, max_steps=steps, per_device_train_batch_size=128,
                        num_generations=8, max_completion_length=4, temperature=1.0, learning_rate=3e-3,
                        lr_scheduler_type="constant_with_warmup", warmup_steps=10, weight_decay=0.1, beta=0.05,
                        distill_warmup_ratio=0.0, distill_decay_ratio=0.0, teacher_template=sdpg.TOY_TEACHER_TEMPLATE,
                        logging_steps=10, report_to="none", save_strategy="no", bf16=False, **VARIANTS[variant])
    t0 = time.time()
    trainer = SDPGTrainer(model=model, reward_funcs=verifier_reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[Evaluate()])
    trainer.train()
    return {"variant": variant, "seed": seed, "evals": evals, "final_accuracy": evals[-1]["accuracy"],
            "run_s": round(time.time() - t0, 1)}


def mean_range(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one CPU thread each")
    p.add_argument("--out", default="runs/trl-check", help="TRL's output_dir of each run (nothing is saved there)")
    p.add_argument("--results", default=os.path.join(HERE, "results", "trl"))
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    t0 = time.time()
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:  # the readers first, one per seed, then every run
        list(pool.map(reader, args.seeds, [os.path.join(args.out, f"reader-seed{s}") for s in args.seeds]))
    with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        runs = list(pool.map(one_run, *zip(*jobs), [args.steps] * len(jobs), [args.eval_every] * len(jobs),
                             [os.path.join(args.out, f"{v}-seed{s}") for v, s in jobs],
                             [os.path.join(args.out, f"reader-seed{s}") for _, s in jobs]))
    wall = time.time() - t0
    lines = [f"`python benchmarks/trl_learning_check.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
             f"{wall / 60:.1f} min wall clock, --jobs {args.jobs}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}",
             "",
             "| variant | accuracy before | final accuracy, mean (lowest-highest seed) | per seed | "
             "the policy's teacher view, before -> final |", "|---|---|---|---|---|"]
    for v in args.variants:
        mine = [r for r in runs if r["variant"] == v]
        lines.append(f"| {v} | {mean_range([r['evals'][0]['accuracy'] for r in mine])} | "
                     f"{mean_range([r['final_accuracy'] for r in mine])} | "
                     + ", ".join(f"{r['final_accuracy']:.2f}" for r in mine) + " | "
                     f"{mean_range([r['evals'][0]['policy_teacher_view'] for r in mine])} -> "
                     f"{mean_range([r['evals'][-1]['policy_teacher_view'] for r in mine])} |")
    text = "\n".join(lines) + "\n\ngreedy accuracy on 80 held-out questions (the multiples of 8)\n"
    print(text)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "wall_s": round(wall), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
