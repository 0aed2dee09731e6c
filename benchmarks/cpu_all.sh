#!/usr/bin/env bash
# Every CPU benchmark of docs/benchmarks.md, in order, on this machine (2 cores: ~75 minutes).
#   bash benchmarks/cpu_all.sh /tmp/refact-full > /tmp/cpu_all.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/refact-full}
PY=.venv/bin/python
T=2
mkdir -p "$W"
log() { echo "=== [$(date +%H:%M:%S)] $*"; }

log "llama-bench from llama-cpp-python's sdist (same llama.cpp commit as the binding)"
if [ ! -x "$W/lb/bin/llama-bench" ]; then
    $PY -m pip download -q --no-deps --no-binary :all: -d "$W/sdist" llama-cpp-python==0.3.36
    tar xzf "$W"/sdist/llama_cpp_python-0.3.36.tar.gz -C "$W/sdist"
    cmake -S "$W/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$W/lb" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF > "$W/lb.log" 2>&1
    cmake --build "$W/lb" --target llama-bench -j $T >> "$W/lb.log" 2>&1 || tail -20 "$W/lb.log"
fi

log "conversion + imatrix + 22 quants"
$PY benchmarks/convert_full.py --work "$W" --json "$W/convert.json"
Q="$W/gguf/q"

log "bench vs llama-bench ($T threads, alternating rounds)"
$PY benchmarks/overhead.py --llama-bench "$W/lb/bin/llama-bench" --threads $T --rounds 5 --json "$W/overhead.json" \
    --model "$Q/Refact-1_6B-fim.Q4_K_M.gguf" --model "$Q/Refact-1_6B-fim.Q8_0.gguf"
for q in Q4_K_M Q8_0; do  # what repacking is worth on this CPU
    "$W/lb/bin/llama-bench" -m "$Q/Refact-1_6B-fim.$q.gguf" -t $T -p 512 -n 128 -r 5 --repack 0 -o md
done

log "bandwidth"
$PY benchmarks/bandwidth.py

log "typing replay (Q4_K_M, $T threads)"
$PY benchmarks/typing_replay.py --model "$Q/Refact-1_6B-fim.Q4_K_M.gguf" --threads $T --json "$W/replay.json" | tail -12

log "memory estimate vs peak RSS"
$PY benchmarks/memory.py --dir "$Q" --threads $T --json "$W/memory.json"

log "eval: every quant vs F16 (2 chunks, 4 FIM tasks)"
$PY -m refact_gguf.cli eval --dir "$Q" --reference "$Q/Refact-1_6B-fim.F16.gguf" --chunks 2 --fim-tasks 4 -t $T --json > "$W/eval.json"
cat "$W/eval.json"
log "done"
