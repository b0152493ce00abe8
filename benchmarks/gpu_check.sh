#!/usr/bin/env bash
# The device check: the GPU tests (tests/test_gpu.py) and the GPU benchmarks (benchmarks/gpu_speed.py) on a machine
# with one NVIDIA GPU, in under 8 minutes. Results go to the "GPU" section of benchmarks/RESULTS.md (the GPU named by
# torch.cuda.get_device_name) and, when $OUT is set, RESULTS.md and the logs are copied there.
#
# It installs nothing: diffusers_uce's dependencies must be importable. The lent H200 machine has torch,
# transformers, accelerate, peft, safetensors, tokenizers and huggingface_hub, but not diffusers. Prepare its wheels
# here, once, from the repository root (python 3.12, x86-64):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 importlib_metadata
#   # only if `import diffusers` fails there on its huggingface_hub, add: huggingface_hub==2.4.0 httpx2 hf-xet
#
# then run it there with the device tool's `run` (carry: [".whl"], timeout_s: 590):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_check.sh
#
# GPU_CHECK_SMOKE=1 runs the same steps on the CPU with tiny shapes and one family (checks this script, no numbers).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
SMOKE=${GPU_CHECK_SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  export DIFFUSERS_UCE_TEST_DEVICE=cpu
  TESTS=(-k "sd1 and float32")
  BENCH=(--smoke --device cpu --families sd15 sdxl)
else
  if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check.sh: no CUDA device (GPU_CHECK_SMOKE=1 runs the smoke version on the CPU)" >&2
    exit 2
  fi
  TESTS=()
  BENCH=()
fi
$PY -c "import diffusers, transformers, torch; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
  || { echo "gpu_check.sh: the package's dependencies are not importable (see this script's header)" >&2; exit 3; }

start=$(date +%s)
# 1. the device tests (about 90 of them, every demo family x float32/float16/bfloat16)
timeout 200 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py "${TESTS[@]}" 2>&1 | tee "$LOGS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
summary=$(grep -E "(passed|failed|error)" "$LOGS/gpu_tests.log" | tail -n 1)
tests_s=$(( $(date +%s) - start ))

# 2. the benchmarks, parts in order edit, memory, generation, compile; each part's results are written as it ends
timeout $(( 470 - tests_s )) $PY benchmarks/gpu_speed.py "${BENCH[@]}" \
  --note "Device tests (\`pytest -m gpu tests/test_gpu.py\`, ${tests_s} s): ${summary:-no summary} (exit ${tests_rc})." \
  2>&1 | tee "$LOGS/gpu_speed.log"
bench_rc=${PIPESTATUS[0]}

if [ -n "${OUT:-}" ]; then cp benchmarks/RESULTS.md "$OUT/RESULTS.md"; fi
echo "gpu_check.sh: tests exit ${tests_rc}, benchmarks exit ${bench_rc}, $(( $(date +%s) - start )) s in all"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
