#!/usr/bin/env bash
# One typist (benchmarks/team_replay.py, 8 warm keystrokes, greedy, n_predict 16) against refact-gguf
# serve with its default threads (as many as other programs leave free), --threads 1, --threads 2, and
# llama-server -t 2 / -t 1 (its default flash attention, and -fa off), on a machine kept idle or with
# another program keeping one core busy (LOAD=1). Same GGUF, same llama.cpp build (LLAMA_CPP_LIB_PATH),
# a fresh server per run, one JSON line per run in $OUT/threads.jsonl:
#   LOAD=1 bash benchmarks/cpu_threads.sh MODEL.gguf LLAMA_BIN_DIR [SIDES...]
set -uo pipefail
M=$1; BIN=$2; shift 2
SIDES=${*:-ours ours-t1 ours-t2 llama-server llama-server-t1 llama-server-fa-off}
OUT=${OUT:-/tmp/cpu_threads}; mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export LLAMA_CPP_LIB_PATH=$BIN
source "$(dirname "$0")/wait_up.sh"
hog=""
if [ "${LOAD:-0}" = 1 ]; then $PY -c "while True: pass" & hog=$!; fi
for side in $SIDES; do
    case $side in
        ours) $PY -m refact_gguf serve -m "$M" --port 8012 --cache-disk-mb 0 > "$OUT/server.log" 2>&1 & pid=$!; port=8012 ;;
        ours-t1) $PY -m refact_gguf serve -m "$M" -t 1 --port 8012 --cache-disk-mb 0 > "$OUT/server.log" 2>&1 & pid=$!; port=8012 ;;
        ours-t2) $PY -m refact_gguf serve -m "$M" -t 2 --port 8012 --cache-disk-mb 0 > "$OUT/server.log" 2>&1 & pid=$!; port=8012 ;;
        llama-server) "$BIN/llama-server" -m "$M" -t 2 -c 4096 --cache-reuse 256 --spm-infill --port 8089 > "$OUT/server.log" 2>&1 & pid=$!; port=8089 ;;
        llama-server-t1) "$BIN/llama-server" -m "$M" -t 1 -c 4096 --cache-reuse 256 --spm-infill --port 8089 > "$OUT/server.log" 2>&1 & pid=$!; port=8089 ;;
        llama-server-fa-off) "$BIN/llama-server" -m "$M" -t 2 -fa off -c 4096 --cache-reuse 256 --spm-infill --port 8089 > "$OUT/server.log" 2>&1 & pid=$!; port=8089 ;;
    esac
    if wait_up $port; then
        $PY benchmarks/team_replay.py --url "http://127.0.0.1:$port" --typists 1 --keystrokes 8 \
            --label "$side load=${LOAD:-0}" --json "$OUT/threads.jsonl"
    else
        echo "$side did not start"; tail -5 "$OUT/server.log"
    fi
    kill $pid; wait $pid 2>/dev/null
done
[ -n "$hog" ] && kill $hog
