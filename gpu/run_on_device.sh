#!/usr/bin/env bash
# The whole GPU check, as one command for an offline CUDA machine (the `device` tool's machines:
# Python 3.12, torch 2.11+cu130, transformers 5.17, lightning 2.6, peft, ... preinstalled).
# Run from the repository root with the wheel folder from `python gpu/wheelhouse.py` beside it
# (.whl/, git-ignored); real records are read from $AMZFT_GPU_DATA, else ../shared/data, else
# the bundled sample. Logs, gpu_check.txt/.json and the GPU tests' output go to $OUT.
#
#   bash gpu/run_on_device.sh [STEPS=30] [BUDGET_S=330]
# Environment: DEADLINE_S=N (the GPU tests end by N s), SKIP_TESTS=1, CHECK_ARGS='--only ... --amzft-args=...'
set -uo pipefail
mkdir -p "${OUT:=gpu-out}"
OUT=$(cd "$OUT" && pwd)
STEPS=${1:-30}
BUDGET=${2:-330}
export PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/amzft-site .whl/*.whl \
  || { echo "wheel install failed (build .whl/ with: python gpu/wheelhouse.py)"; exit 1; }
export PYTHONPATH=/tmp/amzft-site:$PWD/src
{
  nvidia-smi -L
  python3 - <<'PY'
import importlib.metadata as m, sys
names = "torch transformers peft lightning accelerate bitsandbytes datasets trl unsloth unsloth_zoo jsonargparse".split()
print("python", sys.version.split()[0], *(f"{n} {m.version(n)}" for n in names))
PY
} 2>&1 | tee "$OUT/versions.txt"
DATA=${AMZFT_GPU_DATA:-}
python3 gpu/check.py --steps "$STEPS" --budget-s "$BUDGET" --skip-functional ${DATA:+--data "$DATA"} --out "$OUT" ${CHECK_ARGS:-} 2>&1 \
  | tee "$OUT/check.log"
# One archive of the per-run logs: $OUT brings back 8 files at most.
(cd /tmp/amzft-gpu-check 2>/dev/null && tar czf "$OUT/stage_logs.tgz" ./*.log)
# Evaluate / export / exact resume with the unsloth backend (tiny model: seconds once imported).
[ -n "${SKIP_TESTS:-}" ] && { echo "done in ${SECONDS} s (GPU tests skipped)"; exit 0; }
LEFT=$(( ${DEADLINE_S:-3600} - SECONDS ))
timeout $(( LEFT > 30 ? LEFT : 30 )) python3 -m pytest -q -p no:cacheprovider -x tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"
echo "done in ${SECONDS} s"
