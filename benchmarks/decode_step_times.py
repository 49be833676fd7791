"""Milliseconds per decoding step of one generate() call, step by step, for two ways of building the sampler.

Written when the whole-step rows of bench_sdpg.py sampled at about 70 ms per decoding step while its
rollout rows, in the same process, ran at about 20 ms. It asks whether the sampler is to blame: a bf16
copy of a model in eval mode, against a copy of a model in train mode with gradient checkpointing on
(what sdpg.main copies). A logits processor records the clock at every step (after a CUDA sync).
16 answers, 160-token prompts, random weights of the Qwen2.5-0.5B shape on CUDA (a tiny shape on CPU).

    python benchmarks/decode_step_times.py
"""

import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sdpg  # noqa: E402
import sdpg  # noqa: E402
from transformers import LogitsProcessor  # noqa: E402

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
big = device.type == "cuda"


class StepClock(LogitsProcessor):
    """Leaves the scores alone; notes the time at each decoding step."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        if big:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def run(sampler, label: str, new_tokens: int, stop: int) -> None:
    ids = torch.randint(0, stop, (16, 160), device=device)  # (16, 160)
    mask = torch.ones_like(ids)
    clock = StepClock()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=big):  # sdpg.generate's settings, and the clock
        out = sampler.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=True,
                               temperature=1.0, top_p=1.0, top_k=0, eos_token_id=[stop], pad_token_id=0,
                               use_cache=True, logits_processor=[clock])
    if big:
        torch.cuda.synchronize()
    ms = [1000 * (b - a) for a, b in zip(clock.times, clock.times[1:])]
    at = lambda i: f"{ms[i]:.1f}" if i < len(ms) else "-"  # noqa: E731
    print(f"{label}: {out.shape[1] - 160} tok, total {time.perf_counter() - t0:.1f}s, "
          f"first step {1000 * (clock.times[0] - t0):.0f}ms, ms/step at 1,10,100,300,500,700: "
          f"{[at(i) for i in (1, 10, 100, 300, 500, 700)]}, mean {sum(ms) / len(ms):.1f}", flush=True)


def main() -> None:
    torch.manual_seed(0)
    # stop: an id random weights almost never sample at the Qwen shape, so answers run to full length
    model, _, _, (stop,) = bench_sdpg.build_model("qwen2.5-0.5b" if big else "tiny", device)
    model.eval()
    name = torch.cuda.get_device_name() if big else "cpu"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    sampler = sdpg.make_sampler(model, big)
    run(sampler, "clean eval copy (warm-up)", 32, stop)
    run(sampler, "clean eval copy", 512, stop)
    bench_sdpg.set_grad_ckpt(model, True)
    model.train()
    sampler = sdpg.make_sampler(model, big)
    run(sampler, "copy of grad-ckpt train-mode model", 512, stop)
    run(sampler, "same again", 768, stop)


if __name__ == "__main__":
    main()
