#!/usr/bin/env bash
# `make gpu-check`: what only a GPU can show, as one script for a lent GPU machine (about 8 minutes).
#
# 1. pytest -m gpu: tests/test_gpu.py and tests/test_resume.py's CUDA variants (fp16 + GradScaler +
#    clipping with a forced overflow, bf16, channels_last, torch.compile, deterministic runs, Ctrl-C
#    and SIGKILL resumed bitwise, evaluate + export of a CUDA-trained model, the LR range test under fp16);
# 2. bench/gpu.py: the training loop against a bare loop and the textbook recipe at 32 and 224 px,
#    and the default 10-epoch run at 224 px.
#
# It runs on the machine's own Python and torch (no venv, no dvc): src/ goes on PYTHONPATH, and
# the few packages such a machine lacks come from wheels in .whl/ (`make gpu-wheels`, here, first).
# Results: bench/results/gpu.{json,md}, gpu-tests.txt, gpu-bench.txt, gpu-env.txt; copied to $OUT
# when the device tool sets it. Exit status: non-zero if the tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=bench/results
PYTHON=${PYTHON:-python3}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/reprotune-site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/reprotune-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  "$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'torchvision', torchvision.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
} | tee "$RESULTS/gpu-env.txt"

timeout 330 "$PYTHON" -m pytest -m gpu tests/test_gpu.py tests/test_resume.py tests/test_lrfind.py -p no:cacheprovider -q -rA \
  --durations=0 2>&1 | tee "$RESULTS/gpu-tests.txt"
tests=${PIPESTATUS[0]}
timeout 300 "$PYTHON" bench/gpu.py "$@" 2>&1 | tee "$RESULTS/gpu-bench.txt"
bench=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then cp "$RESULTS"/gpu* "$OUT"/; fi
echo "gpu-check: tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
