#!/usr/bin/env bash
# One prepared check on a CUDA machine, run from the repository root:
#   1. the environment (GPU, driver, torch);
#   2. benchmarks/bench_augment.py --device cuda --profile: augmentation vs the forward it feeds;
#   3. tests/test_cuda.py: GPU results against CPU ones, bf16 pretrain + resume, embed, select,
#      torchrun with 2 ranks sharing the GPU over gloo (pretrain, embed, and `mak run` on image
#      folders), the NCCL one-GPU-per-rank error;
#   4. benchmarks/bench_train.py --device cuda: ResNet-50, 224 px, batch 256, bf16;
#   5. benchmarks/bench_select.py --device cuda: k-center, ECLE and the seed share at GPU sizes.
# Each step has its own time limit, so one failure does not lose the others. Logs go to $OUT
# (default ./device-check). Usage: bash benchmarks/device_check.sh
set -u
OUT=${OUT:-$PWD/device-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
{
  date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s"
  tail -n "${TAIL:-14}" "$OUT/$name.txt"
}
step bench_augment_cuda 50 "$PY" benchmarks/bench_augment.py --device cuda --profile
step test_cuda 150 "$PY" -m pytest -q -p no:cacheprovider -rs -s tests/test_cuda.py \
  tests/test_pipeline.py::test_run_under_torchrun_on_image_folders
step bench_train_cuda 100 "$PY" benchmarks/bench_train.py --device cuda --steps 20 --reps 2
step bench_select_cuda 80 "$PY" benchmarks/bench_select.py --device cuda
