#!/usr/bin/env bash
# The GPU rows of sdpg.generate's decoding loop, in one go:
#   1. benchmarks/decode_check.py: the CUDA graph against the same step run eagerly, weights refreshed in
#      place, agreement with transformers' model.generate (the speed rows mean nothing if this fails);
#   2. the benchmark at the Qwen2.5-0.5B shape: sampling at 16 and 128 answers x 256 and 1,024 new tokens
#      from left-padded 100-160-token prompts, against model.generate on the same bf16 sampler; the cache +
#      graph setup time; model.generate's step times with the garbage collector on and off, host load and
#      GPU clocks (--jitter); the whole SDPG step at 16 x 1,024 tokens. The update rows were measured before
#      (benchmarks/results/h200) and are skipped;
#   3. sdpg.py end to end on CUDA with a Qwen2.5-0.5B-shaped random model saved to disk (graphs recorded
#      inside a real run, evaluation, checkpoints, the final model reloads);
#   4. the offline demo's time on the GPU;
#   5. benchmarks/sampling_dtype.py: float32 weights against the bf16 copy, now with the decoding loop.
# Not run yet: prepared on a CPU, where `bash benchmarks/gpu_rollouts.sh OUT --dry-run` runs every part at
# the tiny shape (107 s on 2 CPU cores). Estimate on an H200: 6-9 minutes, most of it model.generate at
# 1,024 tokens; the parts are capped at 120, 330, 120, 90 and 120 s, so run it as one device call with a
# 600 s limit: what is cut is the last part.
# Usage: bash benchmarks/gpu_rollouts.sh OUTPUT_DIR [--dry-run]
set -uo pipefail
out=${1:-gpu_rollouts_out}; mkdir -p "$out"
dry=${2:-}
export PYTHONUNBUFFERED=1
SECONDS=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if [ "$dry" = "--dry-run" ]; then
  shape=(--shape tiny --device cpu --prompt-len 8 --context-len 8 --response-len 16 --rollout-answers 4 8
         --rollout-tokens 8 16 --rollout-prompt-lens 5 9 --steps 1)
  dims=(--hidden 64 --intermediate 341 --layers 2 --heads 4)
  sd=(--answers 2 --repeats 1 --new-tokens 4); steps=(--steps 2 --max-new-tokens 8)
else
  shape=(--shape qwen2.5-0.5b); dims=(--hidden 896 --intermediate 4778 --layers 24 --heads 14)
  sd=(--answers 16 128 --repeats 3 --new-tokens 256); steps=(--steps 4 --max-new-tokens 64)
fi

echo "== 1. decode check"; timeout 120 python3 benchmarks/decode_check.py --json "$out/decode_check.json" 2>&1 \
  | tee "$out/decode_check.txt"
echo "== 2. benchmark"; timeout 330 python3 benchmarks/bench_sdpg.py "${shape[@]}" --skip-update --jitter \
  --json "$out/bench_rollouts.json" 2>&1 | tee "$out/bench_rollouts.md"
echo "== 3. end to end"
python3 benchmarks/save_shape.py /tmp/qwen-shape "${dims[@]}"
timeout 120 python3 sdpg.py --model /tmp/qwen-shape --dataset toy "${steps[@]}" --batch-prompts 8 --eval-n 16 \
  --eval-every 2 --save-every 2 --gradient-checkpointing --output-dir "$out/e2e" 2>&1 \
  | tr "\r" "\n" | grep -v "it/s\]" | tee "$out/e2e.log"
python3 -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$out/e2e/final'); \
print('final checkpoint loads')" 2>&1 | tee -a "$out/e2e.log"
rm -rf "$out/e2e/final" "$out/e2e"/checkpoint-*  # large; the log and metrics are what we keep
echo "== 4. offline demo"
( time timeout 90 python3 sdpg.py --model tiny --dataset toy --output-dir /tmp/demo-$$ ) 2>&1 \
  | tr "\r" "\n" | grep -v "it/s\]" | tail -8 | tee "$out/demo.log"
echo "== 5. sampling dtype"; timeout 120 python3 benchmarks/sampling_dtype.py "${sd[@]}" --json "$out/sampling_dtype.json" \
  2>&1 | tee "$out/sampling_dtype.md"
echo "gpu_rollouts.sh took ${SECONDS}s" | tee "$out/took.txt"
