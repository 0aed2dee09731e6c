#!/usr/bin/env bash
# On the GPU machine (no network): a CUDA build of llama.cpp as it comes, and the same objects
# relinked with -Wl,--exclude-libs,ALL (what setup.sh adds to CUDA builds). For each: does
# libggml-cuda.so export libstdc++, what `python -m refact_gguf.loader` says, and whether loading
# a model in a fresh `python -m refact_gguf.bench` child and `bench` over two models work.
# Carries .whl/ and .sdist/ (benchmarks/gpu_env.sh). Results in $OUT/steps.log.
source benchmarks/gpu_env.sh
configure() { cuda_configure /tmp/lb -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF "$@" >> /tmp/build.log 2>&1; }
log "build llama.cpp (CUDA sm_90), default link"
configure && cmake --build /tmp/lb --target llama -j 16 >> /tmp/build.log 2>&1 || { log "build failed"; tail -30 /tmp/build.log; exit 1; }
mkdir -p /tmp/lib-default && cp -a /tmp/lb/bin/*.so* /tmp/lib-default/
log "relink with -Wl,--exclude-libs,ALL (objects reused)"
configure "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" && cmake --build /tmp/lb --target llama -j 16 >> /tmp/build.log 2>&1 || exit 1
mkdir -p /tmp/lib-private && cp -a /tmp/lb/bin/*.so* /tmp/lib-private/
nvcc --version | tail -1 | tee -a "$OUT/steps.log"

export LLAMA_CPP_LIB_PATH=/tmp/lib-private LD_LIBRARY_PATH=/tmp/lib-private
python3 - <<'EOF'
from pathlib import Path
from refact_gguf.convert import convert
from refact_gguf import catalog
from refact_gguf.convert.synthetic import SyntheticSpec, write_checkpoint
write_checkpoint(Path("/tmp/hf"), SyntheticSpec())
convert(Path("/tmp/hf"), Path("/tmp/m"), "f16", catalog.load().select("Q4_K_M,Q8_0"), threads=16, use_imatrix=False)
EOF
M=/tmp/m/Refact-1_6B-fim.Q4_K_M.gguf
for lib in default private; do
    export LLAMA_CPP_LIB_PATH=/tmp/lib-$lib LD_LIBRARY_PATH=/tmp/lib-$lib
    log "$lib: libggml-cuda.so exports $(nm -D --defined-only /tmp/lib-$lib/libggml-cuda.so | grep -c ' _ZNK\?St6locale') std::locale symbols"
    python3 -m refact_gguf.loader > /dev/null 2> /tmp/loader.err; log "$lib: python -m refact_gguf.loader rc=$? $(cat /tmp/loader.err)"
    python3 -m refact_gguf.bench "[\"$M\", 16, \"99\", 64, 16, 2]" > /tmp/child.out 2>&1; log "$lib: python -m refact_gguf.bench (load + bench in a fresh process) rc=$?"
    python3 -m refact_gguf.cli bench --dir /tmp/m --quant Q4_K_M,Q8_0 --gpu-layers 99 -t 16 -p 64 --n-gen 16 -r 2 > /tmp/multi.out 2>&1
    log "$lib: refact-gguf bench over two models rc=$? $(grep -m1 error /tmp/multi.out)"
done
