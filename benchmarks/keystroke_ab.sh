#!/usr/bin/env bash
# refact-gguf serve and llama-server up at once on one GGUF and one llama.cpp build, one typist
# replayed against each in turn (ABBA order over ROUNDS rounds), each keystroke split into the
# server's prompt / predicted time and what lies outside (benchmarks/keystroke_split.py):
#   LS_FLAGS="-fa off" ROUNDS=4 bash benchmarks/keystroke_ab.sh MODEL.gguf LLAMA_BIN_DIR
#   LS_FLAGS=" " ROUNDS=6 bash benchmarks/keystroke_ab.sh MODEL.gguf LLAMA_BIN_DIR   # llama-server's defaults
#   THREADS=16 GPU_LAYERS=99 LS_FLAGS=" " ROUNDS=6 bash benchmarks/keystroke_ab.sh MODEL.gguf LLAMA_BIN_DIR   # a GPU
set -u
M=$1; BIN=$2
PY=${PYTHON:-.venv/bin/python}
T=${THREADS:-2}; NGL=${GPU_LAYERS:-0}
OUT=${OUT:-/tmp/keystroke_ab}; mkdir -p "$OUT"
export LLAMA_CPP_LIB_PATH=$BIN
source "$(dirname "$0")/wait_up.sh"
$PY -m refact_gguf serve -m "$M" -t "$T" --gpu-layers "$NGL" --port 8012 --cache-disk-mb 0 > "$OUT/ours.log" 2>&1 & p1=$!
# shellcheck disable=SC2086  # LS_FLAGS holds several flags
"$BIN/llama-server" -m "$M" -t "$T" -ngl "$NGL" ${LS_FLAGS:--fa off} -c 4096 --cache-reuse 256 --spm-infill --port 8089 > "$OUT/llama-server.log" 2>&1 & p2=$!
wait_up 8012 && wait_up 8089 || { echo "a server did not start"; tail -5 "$OUT"/*.log; kill $p1 $p2; exit 1; }
for round in $(seq "${ROUNDS:-4}"); do
    if [ $((round % 2)) = 1 ]; then order="8012 8089"; else order="8089 8012"; fi
    for port in $order; do
        label=$([ "$port" = 8012 ] && echo "refact-gguf" || echo "llama-server ${LS_FLAGS:--fa off}")
        $PY benchmarks/keystroke_split.py "http://127.0.0.1:$port" "$label r$round" --json "$OUT/results.jsonl"
    done
done
kill $p1 $p2; wait
