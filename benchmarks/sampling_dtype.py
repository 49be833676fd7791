"""Does sampling from a bf16 copy of the policy decode faster than from the float32 policy itself?

sdpg.py keeps float32 master weights (AdamW's 1e-6 steps would round away in bf16) and, on CUDA,
samples from a bf16 copy (sdpg.make_sampler). This script is the measurement behind that choice.
Decoding speed on a lent GPU has varied by 3x from one call to the next (README, Performance), so
the two kinds of weights take turns: each repeat times one call of each, the order alternating,
and the table gives the median and the range of the repeats. Random weights of the Qwen2.5-0.5B
shape on CUDA (a tiny shape on CPU, which only checks that the script runs), 160-token prompts,
every answer full length.

    python benchmarks/sampling_dtype.py                      # needs a CUDA GPU for real numbers
    python benchmarks/sampling_dtype.py --answers 16 --repeats 3 --new-tokens 64

The first version of this script (commit 85ca4b8) timed the float32 model first and then the same
model cast to bf16, one call each; the README's first table came from it. Both versions measured
transformers' generate under bf16 autocast; sdpg.generate is now a decoding loop of its own that
computes in the weights' dtype (no autocast), so today the float32 row decodes in float32.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sdpg  # noqa: E402
import sdpg  # noqa: E402


def ms_per_step(model, ids: torch.Tensor, new_tokens: int, autocast: bool, stop: int) -> float:
    """Milliseconds per decoding step of one batched sdpg.generate call."""
    device = ids.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        response, _ = sdpg.generate(model, ids, torch.ones_like(ids), new_tokens, 1.0, 1.0, [stop], 0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / response.shape[1]


def measure(model, sampler, answers: int, new_tokens: int, repeats: int, stop: int) -> dict:
    """Alternating calls of the float32 model under bf16 autocast and of its bf16 copy."""
    ids = torch.randint(0, stop, (answers, 160), device=next(model.parameters()).device)  # (answers, 160)
    kinds = {"float32 weights": (model, True), "bf16 copy": (sampler, False)}
    times = {name: [] for name in kinds}
    for m, autocast in kinds.values():  # untimed: sdpg.generate makes its cache and graph once per batch shape
        ms_per_step(m, ids, new_tokens, autocast, stop)
    for r in range(repeats):
        order = list(kinds) if r % 2 == 0 else list(reversed(kinds))  # neither kind always goes first
        for name in order:
            m, autocast = kinds[name]
            times[name].append(ms_per_step(m, ids, new_tokens, autocast, stop))
    return {name: dict(median=statistics.median(t), min=min(t), max=max(t), runs=t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--answers", type=int, nargs="+", default=[16, 128], help="sequences per call, one table row each")
    p.add_argument("--new-tokens", type=int, default=256, help="decoding steps per call")
    p.add_argument("--repeats", type=int, default=5, help="timed calls of each kind, after one warm-up call each")
    p.add_argument("--json", help="also write the results here")
    opts = p.parse_args()

    device, _ = bench_sdpg.pick_device("auto")
    torch.manual_seed(0)
    # stop: an id random weights almost never sample at the Qwen shape, so answers run to full length
    model, _, _, (stop,) = bench_sdpg.build_model("qwen2.5-0.5b" if device.type == "cuda" else "tiny", device)
    model.eval()
    sampler = sdpg.make_sampler(model, True)  # the bf16 copy sdpg.main makes on CUDA
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{opts.new_tokens} new tokens per call, 160-token prompts, {opts.repeats} alternating repeats\n")
    for m, autocast in ((model, True), (sampler, False)):  # warm-up: kernels, allocator, cuBLAS
        ms_per_step(m, torch.randint(0, stop, (2, 160), device=device), 8, autocast, stop)

    results = {}
    print("| answers | weights | median ms per step | min | max |\n|---|---|---|---|---|")
    for answers in opts.answers:
        results[answers] = measure(model, sampler, answers, opts.new_tokens, opts.repeats, stop)
        for kind, r in results[answers].items():
            print(f"| {answers} | {kind} | {r['median']:.1f} | {r['min']:.1f} | {r['max']:.1f} |", flush=True)
    print()
    for answers, r in results.items():
        ratio = r["float32 weights"]["median"] / r["bf16 copy"]["median"]
        print(f"{answers} answers: float32 weights / bf16 copy = {ratio:.2f} (medians)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                           new_tokens=opts.new_tokens, repeats=opts.repeats, results=results), f, indent=1)


if __name__ == "__main__":
    main()
