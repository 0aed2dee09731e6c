#!/usr/bin/env bash
# One call on the GPU machine (no network): build llama.cpp with CUDA for sm_90 from the sources in
# llama-cpp-python's sdist, make a full-size synthetic model, then
#   1. refact-gguf bench vs llama-bench (same build) on Q4_K_M, Q8_0, F16, all layers offloaded,
#      in alternating rounds (benchmarks/overhead.py);
#   2. the typing replay against our server and against llama-server (--cache-reuse 256 --spm-infill).
#   bash benchmarks/gpu_run.sh [all|bench|replay]
# Results land in $OUT as they are made. Needs, carried beside the repo (see docs/benchmarks.md):
#   .whl/  wheels for Python 3.12 (gguf, typer, rich, fastapi, uvicorn, httpx, nvidia-ml-py, …)
#   .sdist/llama-src.tar.gz  llama-cpp-python 0.3.36's sdist, trimmed of docs/models/tests
STEPS=${1:-all}
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/steps.log"

# --exclude-libs: see gpu_cuda_libstdcxx.sh (CUDA 13 exports a second libstdc++ from libggml-cuda.so)
log "build llama.cpp (CUDA sm_90)"
[ -x /tmp/lb/bin/llama-server ] || cuda_configure /tmp/lb -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" > /tmp/build.log 2>&1
TARGETS="llama llama-bench"; [ "$STEPS" = bench ] || TARGETS="$TARGETS llama-server"
cmake --build /tmp/lb --target $TARGETS -j 16 > /tmp/build.log 2>&1 || { log "build failed"; tail -30 /tmp/build.log; exit 1; }
export LLAMA_CPP_LIB_PATH=/tmp/lb/bin LD_LIBRARY_PATH=/tmp/lb/bin
python3 -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode()); print('gpu offload:', llama_cpp.llama_supports_gpu_offload())" | tee -a "$OUT/steps.log"

log "full-size synthetic model → F16, Q4_K_M, Q8_0"
[ -f /tmp/m/Refact-1_6B-fim.Q8_0.gguf ] || python3 - <<'EOF'
from pathlib import Path
from refact_gguf.convert import convert
from refact_gguf import catalog
from refact_gguf.convert.synthetic import SyntheticSpec, write_checkpoint
write_checkpoint(Path("/tmp/hf"), SyntheticSpec.full_size(dtype="float16"))
convert(Path("/tmp/hf"), Path("/tmp/m"), "f16", catalog.load().select("Q4_K_M,Q8_0"), threads=16, use_imatrix=False)  # speed does not depend on it
EOF
ls -la /tmp/m | tee -a "$OUT/steps.log"

if [ "$STEPS" != replay ]; then
    log "bench: refact-gguf vs llama-bench, alternating rounds"
    M=/tmp/m/Refact-1_6B-fim
    python3 benchmarks/overhead.py --llama-bench /tmp/lb/bin/llama-bench --gpu-layers 99 --threads 16 --rounds 4 \
        --model $M.Q4_K_M.gguf --model $M.Q8_0.gguf --model $M.F16.gguf --json "$OUT/overhead.json" \
        > "$OUT/overhead.md" 2>> "$OUT/steps.log"
    cat "$OUT/overhead.md"
    log "bench done"
fi
[ "$STEPS" = bench ] && exit 0

log "typing replay"
M=/tmp/m/Refact-1_6B-fim.Q4_K_M.gguf
python3 benchmarks/typing_replay.py --model "$M" --gpu-layers 99 --threads 16 --json /tmp/replay_ours_spm.json | tail -9 | tee -a "$OUT/steps.log"
python3 benchmarks/typing_replay.py --model "$M" --gpu-layers 99 --threads 16 --order psm --json /tmp/replay_ours_psm.json | tail -9 | tee -a "$OUT/steps.log"
python3 benchmarks/typing_replay.py --model "$M" --gpu-layers 99 --threads 16 --n-indent 0 --json /tmp/replay_ours_spm_indent0.json | tail -9 | tee -a "$OUT/steps.log"
/tmp/lb/bin/llama-server -m "$M" -ngl 99 -c 4096 --port 8089 --cache-reuse 256 --spm-infill > /tmp/llama_server.log 2>&1 &
SERVER=$!
for _ in $(seq 60); do curl -sf http://127.0.0.1:8089/health > /dev/null && break; sleep 1; done
python3 benchmarks/typing_replay.py --url http://127.0.0.1:8089 --n-indent 0 --json /tmp/replay_llama_server_spm.json | tail -9 | tee -a "$OUT/steps.log"
kill $SERVER
cat /tmp/replay_*.json > "$OUT/replays.json" 2>/dev/null
log "done"
