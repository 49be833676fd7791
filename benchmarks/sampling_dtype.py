"""How fast does generate() decode from float32 weights under bf16 autocast, against bf16 weights?

sdpg.py keeps float32 master weights (AdamW's 1e-6 steps would round away in bf16). This script
measured why it samples from a bf16 copy instead of the float32 model under autocast: random
weights of the Qwen2.5-0.5B shape, 16 answers, 160-token prompts, every answer full length.

    python benchmarks/sampling_dtype.py          # needs a CUDA GPU
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import sdpg  # noqa: E402
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config  # noqa: E402

STOP = 151935  # an id random weights almost never sample: answers run to full length


def time_generate(model, ids, mask, new_tokens: int, autocast: bool) -> float:
    """Seconds per new token of one batched sdpg.generate call."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with sdpg.autocast(torch.device("cuda"), autocast):
        response, _ = sdpg.generate(model, ids, mask, new_tokens, 1.0, 1.0, [STOP], 0)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / response.shape[1]


def main() -> None:
    config = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=STOP)
    model = AutoModelForCausalLM.from_config(config).cuda().eval()
    model.generation_config = GenerationConfig(eos_token_id=[STOP], pad_token_id=0)
    ids = torch.randint(0, STOP, (16, 160), device="cuda")
    mask = torch.ones_like(ids)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for label, autocast in (("float32 weights + bf16 autocast", True), ("bf16 weights", False)):
        if not autocast:
            model.to(torch.bfloat16)
        time_generate(model, ids, mask, 16, autocast)  # warm-up
        for new_tokens in (128, 512):
            ms = 1000 * time_generate(model, ids, mask, new_tokens, autocast)
            print(f"{label:32s} {new_tokens:4d} new tokens: {ms:5.1f} ms per token")


if __name__ == "__main__":
    main()
