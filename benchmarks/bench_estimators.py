"""Benchmark: what each distillation estimator (study_trainer.py --distill-estimator) costs per update.

One sdpg.policy_update on one batch of random ids, at a real model shape with random weights (nothing is
downloaded), for the GRPO baseline (beta 0) and for SDPG with each estimator: 'full' (sdpg.py's exact KL over
the whole vocabulary), 'topk' (K tokens and a tail bucket) and 'sampled' (the sampled token's log-ratio), the
last two installed by study_trainer.py. Each runs in a process of its own, so that the CPU's peak memory (the
process's peak RSS, which never goes down) belongs to that one setting. Also the distillation term alone on one
chunk of --chunk-size tokens: forward and backward of each estimator on random logits, and of the exact KL.

    python benchmarks/bench_estimators.py --device cpu --json estimators.json     # reduced lengths, minutes
"""

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_sdpg  # noqa: E402  (the model shapes, the random batch, the timing helpers)
import sdpg  # noqa: E402
import study_trainer  # noqa: E402  (the estimators)

SETTINGS = {"grpo": ["--beta", "0"], "full": [], "topk": ["--distill-estimator", "topk"],
            "sampled": ["--distill-estimator", "sampled"]}


def parse_cli(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=bench_sdpg.SHAPES, default="qwen2.5-0.5b")
    p.add_argument("--device", default="auto")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--batch-prompts", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--context-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=64, help="answer tokens (every answer full length)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--topk", type=int, default=64, help="K of the topk estimator")
    p.add_argument("--steps", type=int, default=2, help="timed updates after one warm-up")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)  # internal: measure one setting, print JSON
    return p.parse_args(argv)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1) / 2**20


def one_setting(opts) -> dict:
    """This process: one update setting at the shape, median time and peak memory."""
    device, bf16 = bench_sdpg.pick_device(opts.device)
    torch.manual_seed(0)
    model, vocab, _, _ = bench_sdpg.build_model(opts.shape, device)
    study, flags = study_trainer.parse(["--distill-topk", str(opts.topk), *SETTINGS[opts.one]])
    study_trainer.install(study)
    args = sdpg.parse_args(["--model", "Qwen2.5-0.5B", "--group-size", str(opts.group_size), "--batch-prompts",
                            str(opts.batch_prompts), "--max-new-tokens", str(opts.response_len), "--chunk-size",
                            str(opts.chunk_size), "--micro-batch", str(opts.group_size * opts.batch_prompts),
                            "--beta", "1e-3", *flags])
    ref = sdpg.frozen_copy(model, torch.bfloat16 if bf16 else torch.float32) if args.alpha > 0 else None
    optimizer, scheduler = sdpg.build_optimizer(model, args)
    rb = bench_sdpg.random_batch(opts, vocab, device)
    bench_sdpg.free_and_reset_peak(device)
    times, rows = [], []
    for _ in range(1 + opts.steps):  # the first warms up and makes AdamW's state
        seconds, row = bench_sdpg.timed(lambda: sdpg.policy_update(bench_sdpg.models(model, ref), optimizer,
                                                                   scheduler, rb, args.beta, args), device)
        times.append(seconds)
        rows.append(row)
    return {"setting": opts.one, "update_s": statistics.median(times[1:]), "peak_gib": bench_sdpg.peak_gib(device),
            "kl_distill": rows[0]["kl_distill"]}


def term_rows(opts) -> list[dict]:
    """The distillation term alone on one chunk: (C, V) random logits, forward + backward."""
    device, _ = bench_sdpg.pick_device(opts.device)
    V = bench_sdpg.SHAPES[opts.shape].get("vocab_size", len(sdpg.build_char_tokenizer()))
    g = torch.Generator().manual_seed(0)
    student = torch.randn(opts.chunk_size, V, generator=g).to(device)
    teacher = torch.randn(opts.chunk_size, V, generator=g).to(device)
    targets = torch.randint(0, V, (opts.chunk_size,), generator=g).to(device)
    out = []
    for name in ("full", "topk", "sampled", "exact KL, no grad (the metric)"):
        def work():
            s = student.clone().requires_grad_(name != "exact KL, no grad (the metric)")
            if not s.requires_grad:
                with torch.no_grad():
                    return sdpg.full_vocab_reverse_kl(s, teacher)
            {"full": lambda: sdpg.full_vocab_reverse_kl(s, teacher),
             "topk": lambda: study_trainer.topk_reverse_kl(s, teacher, opts.topk),
             "sampled": lambda: study_trainer.sampled_reverse_kl(s, teacher, targets)}[name]().sum().backward()
        times = [bench_sdpg.timed(work, device)[0] for _ in range(4)]
        out.append({"term": name, "chunk_s": statistics.median(times[1:])})
    return out


def main(argv=None) -> None:
    opts = parse_cli(argv)
    if opts.one:
        print(json.dumps(one_setting(opts)))
        return
    forward = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if opts.json:
        forward = [a for a in forward if a != opts.json]
    rows = []
    for name in SETTINGS:
        t0 = time.time()
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *forward, "--one", name],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"error: the {name} setting failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]} ({time.time() - t0:.0f} s)", flush=True)
    terms = term_rows(opts)
    meta = {"command": "python " + shlex.join([os.path.relpath(__file__, os.path.dirname(HERE)), *(
        argv if argv is not None else sys.argv[1:])]), "shape": opts.shape, "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": f"{opts.batch_prompts} prompts x G={opts.group_size}, prompt {opts.prompt_len} (+{opts.context_len} "
                 f"context), response {opts.response_len}, chunk {opts.chunk_size}, topk K={opts.topk}"}
    base = next(r["update_s"] for r in rows if r["setting"] == "grpo")
    lines = [f"`{meta['command']}` ({meta['batch']}; torch {meta['torch']}, {meta['threads']} threads)", "",
             "| setting | update (s), median | x GRPO | peak RSS (GiB) | kl_distill logged (exact) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['update_s']:.2f} | {r['update_s'] / base:.2f} | {r['peak_gib']:.2f} | "
              f"{'-' if r['kl_distill'] is None else format(r['kl_distill'], '.4f')} |" for r in rows]
    lines += ["", f"| the term alone, one chunk of {opts.chunk_size} tokens | forward + backward (s), median of 3 |",
              "|---|---|"] + [f"| {t['term']} | {t['chunk_s']:.3f} |" for t in terms]
    print("\n".join(lines))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"meta": meta, "updates": rows, "terms": terms, "table": "\n".join(lines)}, f, indent=2)


if __name__ == "__main__":
    main()
