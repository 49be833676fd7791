"""Benchmark: what SDPG costs over GRPO, and how fast sdpg.py samples.

Every number comes from the project's own functions (sdpg.policy_update, sdpg.generate, ...) run on
random weights of a real model shape, so nothing is downloaded. In one process and on one batch:

  * one update step in GRPO mode (beta = 0, alpha = 0: no teacher forward, no reference model) and
    in SDPG mode (teacher forward + exact full-vocabulary KL + reference model), each with and
    without gradient checkpointing: median time of --steps timed steps after one warm-up, and peak
    memory. The memory of an update row includes the weights, the AdamW state, the gradients and,
    in SDPG mode, the frozen reference copy;
  * one whole training step (sampling + update) in SDPG mode with gradient checkpointing: the
    peak memory a real run needs;
  * rollout throughput of sdpg.generate against a bare model.generate call with the same settings.

Random weights sample almost uniformly over the vocabulary and the stop token is the last id of the
vocabulary, so at the Qwen shapes (151,936 ids) every answer runs to the full length and throughput
is measured at full length. (At the tiny shape's 58 ids sampled answers do stop early: the table
shows the mean answer length of the sampled step.)

    python benchmarks/bench_sdpg.py --shape qwen2.5-0.5b --json bench.json
    python benchmarks/bench_sdpg.py --shape tiny --device cpu     # a quick check on a laptop
"""

import argparse
import dataclasses
import datetime
import gc
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # decode_step_times, for --jitter
import sdpg  # noqa: E402

# Qwen2 shapes. "tiny" is sdpg.build_tiny_model's shape (its vocabulary is the character tokenizer's),
# with room for long positions; the other two are the published Qwen2.5 configs.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=8192),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1e6),
}


def parse_cli(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="qwen2.5-0.5b")
    p.add_argument("--group-size", type=int, default=8, help="G, answers per prompt")
    p.add_argument("--batch-prompts", type=int, default=2, help="prompts per update batch (x G sequences)")
    p.add_argument("--prompt-len", type=int, default=160, help="student prompt tokens")
    p.add_argument("--context-len", type=int, default=200, help="privileged context tokens added to the teacher prompt")
    p.add_argument("--response-len", type=int, default=1024, help="answer tokens (every answer full length)")
    p.add_argument("--device", default="auto", help="auto (CUDA if there is one, as sdpg.py), cuda or cpu")
    p.add_argument("--micro-batch", type=int, help="sdpg's --micro-batch [default: sdpg's own for the model]")
    p.add_argument("--chunk-size", type=int, help="sdpg's --chunk-size [default: sdpg's own]")
    p.add_argument("--steps", type=int, default=3, help="timed repetitions, after one warm-up")
    p.add_argument("--rollout-answers", type=int, nargs="+", default=[16, 128],
                   help="answers (rows) of the sampling measurements, one row of the table each")
    p.add_argument("--rollout-tokens", type=int, nargs="+", default=[256, 1024],
                   help="new tokens of the sampling measurements (every answer full length)")
    p.add_argument("--rollout-prompt-lens", type=int, nargs=2, default=[100, 160], metavar=("MIN", "MAX"),
                   help="the sampling prompts' lengths are drawn from MIN..MAX, so that they are left-padded")
    p.add_argument("--baseline-max-tokens", type=int, default=1024,
                   help="time model.generate only up to this many new tokens (it is the slow one)")
    p.add_argument("--baseline-repeats", type=int, default=1,
                   help="timed model.generate calls per row, after a short warm-up call")
    p.add_argument("--jitter", action="store_true",
                   help="also record model.generate's single-step times with garbage collection on and off, "
                        "the host's load and (CUDA) the GPU's clocks and utilisation")
    p.add_argument("--json", metavar="PATH", help="also write the rows to this JSON file")
    p.add_argument("--skip-rollout", action="store_true")
    p.add_argument("--skip-train", action="store_true", help="no update rows and no whole-step row")
    p.add_argument("--skip-update", action="store_true", help="no update rows (the whole-step row still runs)")
    return p.parse_args(argv)


def sdpg_args(opts, mode: str, grad_ckpt: bool) -> sdpg.Args:
    """sdpg's own settings, through its own parser, so every default is the project's."""
    flags = ["--model", "tiny" if opts.shape == "tiny" else "Qwen2.5-0.5B",  # picks sdpg's preset only
             "--group-size", str(opts.group_size), "--batch-prompts", str(opts.batch_prompts),
             "--max-new-tokens", str(opts.response_len)]
    if opts.micro_batch:
        flags += ["--micro-batch", str(opts.micro_batch)]
    if opts.chunk_size:
        flags += ["--chunk-size", str(opts.chunk_size)]
    if mode == "GRPO":
        flags += ["--beta", "0", "--alpha", "0"]
    if grad_ckpt:
        flags.append("--gradient-checkpointing")
    return sdpg.parse_args(flags)


def pick_device(name: str) -> tuple[torch.device, bool]:
    """--device (auto: CUDA if there is one, as sdpg.main) and whether sdpg computes in bf16 there."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    return device, device.type == "cuda" and torch.cuda.is_bf16_supported()


def models(model, ref) -> sdpg.Models:
    """The policy teaching itself and sampling itself, with its reference (no tokenizer: ids are random)."""
    return sdpg.Models(model, ref, model, model, None, [])


def build_model(shape: str, device: torch.device):
    """Random float32 Qwen2 of the given shape, on the device. Returns (model, vocab, pad id, stop ids)."""
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

    cfg = dict(SHAPES[shape])
    cfg.setdefault("vocab_size", len(sdpg.build_char_tokenizer()))
    vocab = cfg["vocab_size"]
    pad_id, stop_ids = 0, [vocab - 1]  # an id random weights almost never sample: answers run to full length
    config = Qwen2Config(**cfg, tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=stop_ids[0],
                         bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config).to(device)  # float32, torch's default dtype
    # As sdpg.main: our sampling settings, nothing from a stored generation_config.
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad_id)
    return model, vocab, pad_id, stop_ids


def set_grad_ckpt(model, on: bool) -> None:
    # Newer transformers call it activation_checkpointing_* and warn on the old gradient_checkpointing_*.
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(model, f"{name}_{'enable' if on else 'disable'}")()


def random_batch(opts, vocab: int, device: torch.device) -> sdpg.Rollouts:
    """One update batch of random ids, N = prompts x G rows grouped contiguously like collect_rollouts."""
    g = torch.Generator().manual_seed(0)
    B, G, L = opts.batch_prompts, opts.group_size, opts.response_len
    ids = lambda *shape: torch.randint(0, vocab - 1, shape, generator=g)  # noqa: E731, never the stop id
    prompt = ids(B, opts.prompt_len).repeat_interleave(G, dim=0)  # (N, P), G copies of each prompt
    teacher = torch.cat([prompt, ids(B, opts.context_len).repeat_interleave(G, dim=0)], dim=1)  # (N, P + C)
    rewards = torch.randint(0, 2, (B, G), generator=g).float()  # (B, G)
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every group mixed: non-zero advantages, about half gated
    rewards = rewards.view(-1)  # (N,)
    response = ids(B * G, L)  # (N, L), every answer full length: the response mask is all ones
    fields = (prompt, torch.ones_like(prompt), teacher, torch.ones_like(teacher), response, torch.ones_like(response),
              rewards, sdpg.group_advantages(rewards, G))
    return sdpg.Rollouts(*(t.to(device) for t in fields))


# -----------------------------------------------------------------------------
# Timing and memory. CUDA runs asynchronously: synchronise before reading the clock.


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_and_reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float:
    """CUDA: peak allocated since the last reset. CPU: peak RSS of the process so far (it never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
    return kib / 2**20


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def make_trainer(model, args: sdpg.Args, bf16: bool):
    """Reference copy, optimiser and schedule exactly as sdpg.main builds them."""
    set_grad_ckpt(model, args.gradient_checkpointing)
    ref = sdpg.frozen_copy(model, torch.bfloat16 if bf16 else torch.float32) if args.alpha > 0 else None
    opt, sched = sdpg.build_optimizer(model, args)
    return ref, opt, sched


def measure(row: dict, work, model, device) -> dict:
    """Runs work() -> dict of results into row; an out-of-memory error becomes "OOM", not a crash."""
    try:
        row.update(work())
    except torch.cuda.OutOfMemoryError:
        row.update(time_s="OOM", peak_gib="OOM")
    model.zero_grad(set_to_none=True)  # after the except block, so the traceback's tensors are gone too
    free_and_reset_peak(device)
    return row


def update_row(model, rb, opts, mode, grad_ckpt, device, bf16) -> dict:
    args = sdpg_args(opts, mode, grad_ckpt)

    def work():
        ref, opt, sched = make_trainer(model, args, bf16)
        free_and_reset_peak(device)
        step = lambda: sdpg.policy_update(models(model, ref), opt, sched, rb, args.beta, args)  # noqa: E731
        times = [timed(step, device)[0] for _ in range(1 + opts.steps)]  # the first warms up, makes AdamW's state
        return dict(time_s=statistics.median(times[1:]), peak_gib=peak_gib(device), answer_tokens=opts.response_len)

    return measure(dict(kind="update", mode=mode, grad_ckpt=grad_ckpt), work, model, device)


def whole_step_row(model, rb, opts, stop_ids, pad_id, device, bf16) -> dict:
    """Sampling + update, SDPG with gradient checkpointing: the peak a real training step reaches."""
    args = sdpg_args(opts, "SDPG", grad_ckpt=True)

    def work():
        ref, opt, sched = make_trainer(model, args, bf16)
        sdpg.policy_update(models(model, ref), opt, sched, rb, args.beta, args)  # AdamW state, as from step 2
        free_and_reset_peak(device)

        sampler = sdpg.make_sampler(model, bf16)  # as sdpg.main: a bf16 copy on CUDA

        def step():  # what collect_rollouts + policy_update do, minus tokenising and the verifier
            sdpg.refresh_sampler(sampler, model)
            with sdpg.autocast(device):
                resp, mask = sdpg.generate(sampler, rb.prompt_ids, rb.prompt_mask, args.max_new_tokens,
                                           args.temperature, 1.0, stop_ids, pad_id)
            sdpg.policy_update(models(model, ref), opt, sched,
                               dataclasses.replace(rb, response_ids=resp, response_mask=mask), args.beta, args)
            return mask.sum(dim=1).float().mean().item()

        # Random weights at the tiny shape's 58-id vocabulary do sample the stop id: answers end early there.
        first_s, _ = timed(step, device)  # includes making the decoding cache and graph, once per run
        seconds, answer_tokens = timed(step, device)
        return dict(time_s=seconds, first_step_s=first_s, peak_gib=peak_gib(device), answer_tokens=answer_tokens)

    return measure(dict(kind="whole_step", mode="SDPG", grad_ckpt=True), work, model, device)


def rollout_prompts(opts, answers: int, vocab: int, pad_id: int, device: torch.device):
    """answers / G prompts of random lengths in the --rollout-prompt-lens range, G copies each, left-padded."""
    g = torch.Generator().manual_seed(answers)
    low, high = opts.rollout_prompt_lens
    prompts = [torch.randint(1, vocab - 1, (int(torch.randint(low, high + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(max(1, answers // opts.group_size))]
    rows = [p for p in prompts for _ in range(opts.group_size)][:answers]  # never pad_id or the stop id
    return sdpg.left_pad(rows, pad_id, device)  # (N, P) each


def rollout_rows(model, opts, vocab, stop_ids, pad_id, device, bf16) -> list[dict]:
    """Sampling speed: sdpg.generate (our decoding loop) against transformers' model.generate on the same
    sampler (a bf16 copy on CUDA, as sdpg.main makes it), for each number of answers and of new tokens."""
    args = sdpg_args(opts, "SDPG", grad_ckpt=False)
    set_grad_ckpt(model, False)
    model.eval()
    sampler = sdpg.make_sampler(model, bf16)
    rows = []
    for N in opts.rollout_answers:
        ids, mask = rollout_prompts(opts, N, vocab, pad_id, device)
        for T in opts.rollout_tokens:
            def ours():  # what a training step does: refresh the sampler's weights, then one batched call
                sdpg.refresh_sampler(sampler, model)
                return sdpg.generate(sampler, ids, mask, T, args.temperature, 1.0, stop_ids, pad_id)[0]

            def bare(tokens=T):  # the same sampler and settings, straight into transformers
                return sdpg.hf_generate(sampler, ids, mask, tokens, args.temperature, 1.0, stop_ids, pad_id)[0]

            free_and_reset_peak(device)
            # The cache and (on CUDA) the graph of the step, once per batch shape: what a run pays once.
            setup_s, _ = timed(lambda: sdpg.decode_state_for(sampler, N, ids.shape[1] + T, args.temperature,
                                                             stop_ids, pad_id), device)
            rows.append(dict(kind="decode_setup", answers=N, new_tokens=T, time_s=setup_s))
            for name, fn, repeats in (("sdpg.generate", ours, opts.steps),
                                      ("model.generate", bare, opts.baseline_repeats)):
                if name == "model.generate" and T > opts.baseline_max_tokens:
                    continue

                def work(fn=fn, repeats=repeats, name=name):
                    if name == "model.generate":
                        timed(lambda: bare(16), device)  # warm-up, short: a full one takes a minute at 1,024 tokens
                        runs = [timed(fn, device) for _ in range(repeats)]
                    else:
                        runs = [timed(fn, device) for _ in range(1 + repeats)][1:]  # the first one warms up
                    new_tokens = runs[-1][1].shape[1]  # columns sampled; T unless every row stopped early
                    t = statistics.median(r[0] for r in runs)
                    return dict(time_s=t, new_tokens=new_tokens, ms_per_step=1000 * t / new_tokens,
                                tokens_per_s=N * new_tokens / t, runs=len(runs), peak_gib=peak_gib(device))

                free_and_reset_peak(device)
                rows.append(measure(dict(kind="rollout", sampler=name, answers=N, prompt_len=ids.shape[1],
                                         max_new_tokens=T), work, model, device))
            pair = {r["sampler"]: r for r in rows if r["kind"] == "rollout" and r["answers"] == N
                    and r["max_new_tokens"] == T}
            if len(pair) == 2:
                rows.append(dict(kind="rollout_ratio", answers=N, new_tokens=T, throughput_ratio=ratio(
                    pair["sdpg.generate"]["tokens_per_s"], pair["model.generate"]["tokens_per_s"])))
            print(f"rollout rows done ({N} answers x {T} tokens)", flush=True)
    return rows


def gpu_status() -> str | None:
    """SM clock, memory clock, utilisation, temperature and power from nvidia-smi, or None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,utilization.gpu,temperature.gpu,"
                              "power.draw", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def jitter_rows(model, opts, vocab, stop_ids, pad_id, device, bf16) -> list[dict]:
    """What makes model.generate's decoding steps vary: its single-step times (a clock in a logits processor,
    after a sync), with Python's garbage collector on and then off, beside the host's load average and the
    GPU's clocks and utilisation read by nvidia-smi while it runs."""
    from decode_step_times import StepClock

    model.eval()
    sampler = sdpg.make_sampler(model, bf16)
    T = min(opts.rollout_tokens)
    rows = []
    for N in opts.rollout_answers:
        ids, mask = rollout_prompts(opts, N, vocab, pad_id, device)
        for collector in ("on", "off"):
            samples, stop = [], threading.Event()

            def watch():
                while not stop.wait(1.0):
                    samples.append(gpu_status())

            watcher = threading.Thread(target=watch, daemon=True)
            clock = StepClock()
            load_before = os.getloadavg()[0]
            (gc.enable if collector == "on" else gc.disable)()
            watcher.start()
            try:
                with sdpg.autocast(device):
                    sampler.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=True, top_k=0,
                                     eos_token_id=stop_ids, pad_token_id=pad_id, logits_processor=[clock])
            finally:
                gc.enable()
                stop.set()
                watcher.join()
            ms = sorted(1000 * (b - a) for a, b in zip(clock.times, clock.times[1:]))
            rows.append(dict(kind="jitter", answers=N, new_tokens=T, gc=collector, median_ms=statistics.median(ms),
                             p90_ms=ms[int(0.9 * (len(ms) - 1))], max_ms=ms[-1], load_before=load_before,
                             load_after=os.getloadavg()[0], gpu_samples=[s for s in samples if s]))
    return rows


# -----------------------------------------------------------------------------
# Report


def ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else None


def fmt(x, spec=".3f"):
    return "-" if x is None else x if isinstance(x, str) else format(x, spec)


STEP_LABELS = {"update": "update", "whole_step": "sample + update (second run)"}


def report(meta: dict, rows: list[dict]) -> str:
    lines = [f"# SDPG benchmark: {meta['shape']} on {meta['device_name']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    updates = [r for r in rows if r["kind"] in ("update", "whole_step")]
    if updates:
        lines += ["| step | mode | grad ckpt | answer tokens (mean) | median step (s) | first run (s) | "
                  "peak memory (GiB) |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {STEP_LABELS[r['kind']]} | {r['mode']} | {'on' if r['grad_ckpt'] else 'off'} | "
                  f"{fmt(r.get('answer_tokens'), '.0f')} | {fmt(r['time_s'])} | {fmt(r.get('first_step_s'))} | "
                  f"{fmt(r['peak_gib'], '.2f')} |" for r in updates]
        lines += ["", "| ratio SDPG / GRPO | grad ckpt | time | memory |", "|---|---|---|---|"]
        lines += [f"| update | {'on' if r['grad_ckpt'] else 'off'} | {fmt(r['time_ratio'], '.2f')} | "
                  f"{fmt(r['memory_ratio'], '.2f')} |" for r in rows if r["kind"] == "update_ratio"]
        lines.append("")
    rollouts = [r for r in rows if r["kind"] == "rollout"]
    if rollouts:
        lines += ["| sampler | answers | prompt columns | new tokens | timed runs | median time (s) | ms per decoding "
                  "step | tokens/s | peak memory (GiB) |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['sampler']} | {r['answers']} | {r['prompt_len']} | {r.get('new_tokens', '-')} | "
                  f"{r.get('runs', '-')} | {fmt(r['time_s'])} | {fmt(r.get('ms_per_step'), '.2f')} | "
                  f"{fmt(r.get('tokens_per_s'), '.0f')} | {fmt(r['peak_gib'], '.2f')} |" for r in rollouts]
        setup = {(r["answers"], r["new_tokens"]): r["time_s"] for r in rows if r["kind"] == "decode_setup"}
        speedup = {(r["answers"], r["new_tokens"]): r["throughput_ratio"] for r in rows if r["kind"] == "rollout_ratio"}
        lines += ["", "| answers x new tokens | cache + graph setup (s), once per shape | tokens/s, sdpg.generate / "
                  "model.generate |", "|---|---|---|"]
        lines += [f"| {n} x {t} | {fmt(s)} | {fmt(speedup.get((n, t)), '.2f')} |" for (n, t), s in setup.items()]
        lines.append("")
    jitter = [r for r in rows if r["kind"] == "jitter"]
    if jitter:
        lines += ["| model.generate, answers x tokens | garbage collector | ms per step: median | p90 | max | "
                  "host load before / after | GPU samples (SM MHz, mem MHz, util, temp, power) |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['answers']} x {r['new_tokens']} | {r['gc']} | {fmt(r['median_ms'], '.1f')} | "
                  f"{fmt(r['p90_ms'], '.1f')} | {fmt(r['max_ms'], '.1f')} | {r['load_before']:.2f} / "
                  f"{r['load_after']:.2f} | {'; '.join(r['gpu_samples'][:3]) or '-'} |" for r in jitter]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    opts = parse_cli(argv)
    device, bf16 = pick_device(opts.device)
    torch.manual_seed(0)
    model, vocab, pad_id, stop_ids = build_model(opts.shape, device)
    args = sdpg_args(opts, "SDPG", grad_ckpt=False)
    N = opts.batch_prompts * opts.group_size
    meta = dict(
        shape=opts.shape, device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        precision="float32 weights, bf16 autocast" if bf16 else "float32",
        torch=torch.__version__, transformers=__import__("transformers").__version__,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command="python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]),
        parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, vocabulary {vocab}",
        update_batch=f"{opts.batch_prompts} prompts x G={opts.group_size} = {N} sequences, prompt {opts.prompt_len} "
                     f"(+{opts.context_len} context for the teacher), response {opts.response_len} (all full length)",
        sdpg_settings=f"micro_batch {args.micro_batch}, chunk_size {args.chunk_size}, lr {args.lr}, beta {args.beta}, "
                      f"alpha {args.alpha} (SDPG; GRPO: beta 0, alpha 0), kl_mode {args.kl_mode}",
        timing=f"median of {opts.steps} timed runs after 1 warm-up",
        memory="torch.cuda.max_memory_allocated since the row began" if device.type == "cuda" else
               "peak RSS of the whole process so far (ru_maxrss, a lifetime max: it never goes down row to row)",
    )
    print("\n".join(f"{k}: {v}" for k, v in meta.items()), flush=True)

    rows = []
    if not opts.skip_rollout:
        rows += rollout_rows(model, opts, vocab, stop_ids, pad_id, device, bf16)
    if opts.jitter:
        rows += jitter_rows(model, opts, vocab, stop_ids, pad_id, device, bf16)
        print("jitter rows done", flush=True)
    if not opts.skip_train:
        rb = random_batch(opts, vocab, device)
        for grad_ckpt in () if opts.skip_update else (False, True):
            grpo = update_row(model, rb, opts, "GRPO", grad_ckpt, device, bf16)
            sdpg_row = update_row(model, rb, opts, "SDPG", grad_ckpt, device, bf16)
            rows += [grpo, sdpg_row, dict(kind="update_ratio", grad_ckpt=grad_ckpt,
                                          time_ratio=ratio(sdpg_row["time_s"], grpo["time_s"]),
                                          # a CPU "peak" is the process's lifetime max: no ratio
                                          memory_ratio=ratio(sdpg_row["peak_gib"], grpo["peak_gib"])
                                          if device.type == "cuda" else None)]
            print(f"update rows done (grad ckpt {'on' if grad_ckpt else 'off'})", flush=True)
        rows.append(whole_step_row(model, rb, opts, stop_ids, pad_id, device, bf16))
    print("\n" + report(meta, rows))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
