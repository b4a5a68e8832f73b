#!/usr/bin/env bash
# The GPU check (issue 22): on a machine with one GPU and no package registry, PyTorch with CUDA,
# transformers and pyyaml only, it installs the DeepSpeed it brings, then
#   1. the layer bench in bf16 at the 7B MLP shape (tools/bench.py layers),
#   2. a short random-init 1B run (configs/experiments/llama_1b.yaml) under ZeRO-3 in bf16 and in
#      fp16, PST, LoRA and dense full fine-tuning (tools/gpu_step.py),
#   3. the cost model's predictions for the same (tools/estimate_step.py),
# and prints the figures side by side; everything lands under $OUT (default runs/gpu_check).
#
#   bash tools/gpu_check.sh --prepare   # here, with a registry: wheels into .wheels/ (git-ignored)
#   bash tools/gpu_check.sh             # there: install from .wheels/ (carry it), then run
#   bash tools/gpu_check.sh --dry-run   # on CPU: the same steps at toy sizes in fp32 (tested)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.wheels}
OUT=${OUT:-runs/gpu_check}
PY=${PYTHON:-python3}
# DeepSpeed's own pure-Python dependencies; PyTorch, transformers and pyyaml are on the machine.
DEEPSPEED_DEPS="hjson py-cpuinfo msgpack psutil ninja nvidia-ml-py einops pydantic annotated-types \
typing-inspection pydantic-core packaging tqdm filelock"
DEEPSPEED_VERSION=$(sed -n 's/.*"deepspeed==\([0-9.]*\)".*/\1/p' setup.py)

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS"
  # DeepSpeed ships a source archive: build its wheel here once (pure Python, no ops compiled).
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "deepspeed==$DEEPSPEED_VERSION"
  for version in 3.10 3.11 3.12 3.13; do  # whichever Python the GPU machine has
    $PY -m pip download -q --only-binary=:all: --python-version $version --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" $DEEPSPEED_DEPS
  done
  du -sh "$WHEELS"
  exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p "$OUT"
if ! $PY -c "import deepspeed" 2>/dev/null; then
  ls "$WHEELS"/deepspeed-*.whl >/dev/null 2>&1 || {
    echo "pst-ds: error: no DeepSpeed here and no wheel in $WHEELS: run 'bash tools/gpu_check.sh --prepare' where a registry is reachable, and bring $WHEELS" >&2
    exit 2
  }
  $PY -m pip install -q --no-index --find-links "$WHEELS" deepspeed
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ $DRY = 1 ]; then  # toy sizes on CPU, fp32: every step of the check, quickly
  SHAPES="tiny"; DTYPE=fp32; CONFIG=configs/experiments/tiny_llama.yaml
  RUNS="configs/zero3.json"; STEPS=3; REPEATS=2; LAUNCH="--num_gpus 1"
else
  SHAPES="llama7b-mlp"; DTYPE=bf16; CONFIG=configs/experiments/llama_1b.yaml
  RUNS="configs/zero3_bf16.json configs/zero3_fp16.json"; STEPS=8; REPEATS=5; LAUNCH="--num_gpus 1"
fi

echo "== 1. layer bench ($DTYPE, $SHAPES)"
$PY tools/bench.py layers --shapes $SHAPES --repeats $REPEATS --dtype $DTYPE --out "$OUT/layers"

echo "== 2. ZeRO-3 steps ($CONFIG)"
for ds in $RUNS; do
  name=$(basename "$ds" .json)
  $PY -m deepspeed.launcher.runner $LAUNCH --master_port 29533 tools/gpu_step.py --config "$CONFIG" --ds_config "$ds" \
    --steps $STEPS --out "$OUT/$name"
done

echo "== 3. the cost model beside them"
$PY tools/estimate_step.py --measured "$OUT/layers/layers.json" --configs "$CONFIG" --out "$OUT/estimate"
echo "pst-ds: GPU check done; figures in $OUT"
