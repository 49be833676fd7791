"""Saves a randomly initialised Qwen2-architecture model of a given shape, with sdpg.py's character tokenizer,
as a from_pretrained directory: a stand-in for a real checkpoint on a machine that cannot download one (the
GPU scripts run sdpg.py end to end on it). The defaults are the Qwen2.5-0.5B shape (with a small vocabulary).

    python benchmarks/save_shape.py /tmp/qwen-shape [--hidden 896 --intermediate 4864 --layers 24 --heads 14]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sdpg  # noqa: E402

from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory to write")
    p.add_argument("--hidden", type=int, default=896, help="hidden size")
    p.add_argument("--intermediate", type=int, default=4864, help="MLP size")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14, help="query heads; key/value heads: 2")
    args = p.parse_args()
    tok = sdpg.build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(args.out)
    tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
