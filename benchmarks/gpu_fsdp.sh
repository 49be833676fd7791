#!/usr/bin/env bash
# sdpg.py --fsdp end to end on CUDA with ONE process (torchrun --nproc-per-node 1), next to the plain run,
# each reporting torch.cuda.max_memory_allocated(). With one process FSDP2 shards nothing (a shard is the
# whole tensor), so this checks that the --fsdp path runs on a GPU (NCCL, bf16 sampler refreshed from
# DTensors, gathered checkpoint), not what sharding saves; that needs several GPUs and is not measured.
# The model is a Qwen2.5-0.5B-shaped random model saved to disk (no download).
# Usage: bash benchmarks/gpu_fsdp.sh OUTPUT_DIR          on a GPU
#        bash benchmarks/gpu_fsdp.sh --dry-run OUTPUT_DIR  the same commands on the CPU with the tiny model
set -euo pipefail
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-gpu_fsdp_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.

cat > "$out/measure.py" <<'PY'
import sys

import torch

import sdpg

sdpg.main(sys.argv[1:])
if torch.cuda.is_available():
    print(f"max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
else:
    print("max_memory_allocated n/a (CPU)")
PY

if [ "$dry" = 1 ]; then
  model=(--model tiny --device cpu --steps 2 --batch-prompts 4 --group-size 4 --eval-n 8)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 benchmarks/save_shape.py /tmp/qwen-shape
  model=(--model /tmp/qwen-shape --dataset toy --steps 3 --batch-prompts 8 --max-new-tokens 64 --eval-n 16
         --gradient-checkpointing)
fi

for mode in plain fsdp; do
  flags=("${model[@]}" --eval-every 0 --save-every 2 --output-dir "$out/$mode" --overwrite)
  [ "$mode" = fsdp ] && flags+=(--fsdp)
  echo "== $mode"
  python3 -m torch.distributed.run --standalone --nproc-per-node 1 "$out/measure.py" "${flags[@]}" 2>&1 \
    | tr "\r" "\n" | grep -v "it/s\]" | tee "$out/$mode.log"
  python3 -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('$out/$mode/final'); print('final loads')"
  rm -rf "$out/$mode/final" "$out/$mode"/checkpoint-*
done
grep -H max_memory_allocated "$out"/plain.log "$out"/fsdp.log
