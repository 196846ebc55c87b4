#!/usr/bin/env bash
# Every GPU speed table in about 9 minutes on one H200, as markdown under $OUT (default ./gpu_out):
#   gpu_tests.txt   the `gpu`-marked tests: every attention backend equals eager on packed rows (forward, backward),
#                   liger / cut-cross-entropy equal the chunked head where installed
#   gpu.md          MFU per backend, compiled or not, chunked head or not, the profiler breakdown, the matmul
#                   ceiling, InternVL3-8B full width (4 layers) and LoRA, InternVL3.5-8B and -30B-A3B (MoE) full width
#                   (4 layers) and LoRA, float8 if torchao imports (benchmarks/gpu.py)
#   chunked_head.md peak memory of the head + loss, chunked vs not, bf16 (benchmarks/chunked_head.py)
#   train_step.md   one step beside transformers' InternVLForConditionalGeneration on the same padded batch, bf16
#
#   bash benchmarks/gpu.sh           # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --tiny    # CPU rehearsal of the same commands at tiny sizes (a few minutes)
#
# The GPU image lacks pytest, torchao and liger-kernel: wheels in ./wheels (untracked, they travel with the working
# tree) are installed first, e.g. made here with
#   pip download --no-deps -d wheels pytest pluggy iniconfig packaging pygments torchao liger-kernel
# Every step has its own time limit (75 + 275 + 30 + 160 s), so one that hangs or crashes costs its own rows only;
# gpu.py runs its measurements in priority order and marks those its budget did not reach "skipped".
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
TINY=""
[ "${1:-}" = "--tiny" ] && TINY=1
start=$(date +%s)
say() { echo "[gpu.sh $(( $(date +%s) - start )) s] $*" | tee -a "$OUT/gpu_sh.log"; }

if [ -z "$TINY" ] && compgen -G "wheels/*.whl" > /dev/null; then
  say "installing wheels/"
  "$PY" -m pip install --no-deps --no-index -q wheels/*.whl >> "$OUT/gpu_sh.log" 2>&1 || say "wheel install failed"
fi
{ "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2> /dev/null || true; } > "$OUT/machine.txt"

say "gpu tests"
if "$PY" -c "import pytest" 2> /dev/null; then
  timeout 75 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_backends.py tests/test_chunked_head.py \
    > "$OUT/gpu_tests.txt" 2>&1
  say "gpu tests: exit $? ($(tail -n 1 "$OUT/gpu_tests.txt"))"
else
  echo "pytest is not installed (see the wheels note at the top of benchmarks/gpu.sh)" > "$OUT/gpu_tests.txt"
  say "gpu tests skipped: no pytest"
fi

say "benchmarks/gpu.py"
if [ -n "$TINY" ]; then
  timeout 400 "$PY" benchmarks/gpu.py --tiny --budget 360 --timeout 200 > "$OUT/gpu_py.txt" 2>&1
else
  timeout 275 "$PY" benchmarks/gpu.py --budget 260 --timeout 130 > "$OUT/gpu_py.txt" 2>&1
fi
say "benchmarks/gpu.py: exit $?"

say "benchmarks/chunked_head.py"
if [ -n "$TINY" ]; then
  timeout 120 "$PY" benchmarks/chunked_head.py --vocab 8192 --positions 2048 > "$OUT/chunked_head.txt" 2>&1
else
  timeout 30 "$PY" benchmarks/chunked_head.py --device cuda --dtype bf16 > "$OUT/chunked_head.txt" 2>&1
fi
say "benchmarks/chunked_head.py: exit $?"

say "benchmarks/train_step.py (beside transformers, padded batch)"
if [ -n "$TINY" ]; then
  timeout 200 "$PY" benchmarks/train_step.py --configs tiny-padded --rounds 1 --warmup 1 --steps 2 \
    > "$OUT/train_step.txt" 2>&1
else
  timeout 160 "$PY" benchmarks/train_step.py --device cuda --configs InternVL3-1B-padded --backends \
    --ours-backend varlen --ours-compile --rounds 1 --warmup 3 --steps 5 --timeout 90 > "$OUT/train_step.txt" 2>&1
fi
say "benchmarks/train_step.py: exit $?"
say "done: $(ls "$OUT" | tr '\n' ' ')"
