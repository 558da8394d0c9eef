#!/usr/bin/env bash
# The whole GPU check, as one command for an offline CUDA machine (the `device` tool's machines:
# Python 3.12, torch 2.11+cu130, transformers 5.17, lightning 2.6, peft, ... preinstalled).
# Run from the repository root with the wheel folder from `python gpu/wheelhouse.py` beside it
# (.whl/, git-ignored); real records are read from $AMZFT_GPU_DATA, else the first .gpudata/*.jsonl
# (git-ignored: carry it), else the bundled sample.
#
#   bash gpu/run_on_device.sh [STEPS=30] [BUDGET_S=300]
#
# Runs, most wanted first, each in its own process (gpu/check.py's RUNS): base.yaml (unsloth),
# reference (the seed's Unsloth + TRL), large-batch (configs/full.yaml), hf (+ nf4 + Liger),
# hf-plain (+ nf4); no run starts after BUDGET_S seconds. After each run the figures so far go
# to $OUT/gpu-YYYYMMDD.json (format: gpu/result_file.py; copy it to benchmarks/results/).
# Then tests/test_gpu.py (Liger against the plain path first, then Unsloth's resume / evaluate /
# export), killed at DEADLINE_S. Sized so that the whole command takes about 9 minutes: on an
# H200 (2026-12-04) each run took 65-87 s, so BUDGET_S 300 runs the first four and leaves the
# tests ~180 s; they took ~120 s after the runs had warmed the compile caches, and more than
# 155 s alone on a fresh machine (SKIP_CHECK=1: give them DEADLINE_S 400).
# Environment: DEADLINE_S=N (default 540), SKIP_TESTS=1, SKIP_CHECK=1 (the tests alone),
# CHECK_ARGS='--only base.yaml,reference --amzft-args=...'
# $OUT gets 7 files: versions.txt, check.log, gpu-YYYYMMDD.json, gpu_check.txt, gpu_check.json,
# stage_logs.tgz, pytest_gpu.log (a device call brings back 8 files at most).
set -uo pipefail
mkdir -p "${OUT:=gpu-out}"
OUT=$(cd "$OUT" && pwd)
STEPS=${1:-30}
BUDGET=${2:-300}
DEADLINE=${DEADLINE_S:-540}
export AMZFT_GPU_COMMAND="DEADLINE_S=$DEADLINE${CHECK_ARGS:+ CHECK_ARGS='$CHECK_ARGS'} bash gpu/run_on_device.sh $STEPS $BUDGET"
export PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/amzft-site .whl/*.whl \
  || { echo "wheel install failed (build .whl/ with: python gpu/wheelhouse.py)"; exit 1; }
export PYTHONPATH=/tmp/amzft-site:$PWD/src
{
  nvidia-smi -L
  python3 - <<'PY'
import importlib.metadata as m, sys
names = "torch transformers peft lightning accelerate bitsandbytes datasets trl unsloth unsloth_zoo liger-kernel triton jsonargparse".split()
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return "missing"
print("python", sys.version.split()[0], *(f"{n} {version(n)}" for n in names))
PY
} 2>&1 | tee "$OUT/versions.txt"
DATA=${AMZFT_GPU_DATA:-$(ls .gpudata/*.jsonl 2>/dev/null | head -n 1)}
[ -z "${SKIP_CHECK:-}" ] && python3 gpu/check.py --steps "$STEPS" --budget-s "$BUDGET" --skip-functional ${DATA:+--data "$DATA"} --out "$OUT" ${CHECK_ARGS:-} 2>&1 \
  | tee "$OUT/check.log"
# One archive of the per-run logs: $OUT brings back 8 files at most.
(cd /tmp/amzft-gpu-check 2>/dev/null && tar czf "$OUT/stage_logs.tgz" ./*.log)
[ -n "${SKIP_TESTS:-}" ] && { echo "done in ${SECONDS} s (GPU tests skipped)"; exit 0; }
LEFT=$(( DEADLINE - SECONDS ))
# KILL, not timeout's default TERM: amzft's graceful stop would turn a TERM inside a test's fit
# into a short run and a failed assertion, which reads like a bug (seen on 2026-12-04).
# -v: each test's result as it ends, so a killed run still says which passed; --log-level INFO:
# a failure's captured log without torch.compile's thousand DEBUG trace lines.
timeout -s KILL $(( LEFT > 30 ? LEFT : 30 )) python3 -m pytest -v -p no:cacheprovider --log-level=INFO tests/test_gpu.py 2>&1 \
  | tee "$OUT/pytest_gpu.log"
[ "${PIPESTATUS[0]}" = 137 ] && echo "tests/test_gpu.py killed at DEADLINE_S=$DEADLINE s: unfinished, not failed" \
  | tee -a "$OUT/pytest_gpu.log"
echo "done in ${SECONDS} s"
