#!/usr/bin/env bash
# The serving engine on this CPU against llama-server (and, optionally, an older refact-gguf tree),
# same GGUF, same llama.cpp build (LLAMA_CPP_LIB_PATH), same client, alternating, a fresh server per run:
#   bash benchmarks/cpu_team.sh MODEL.gguf LLAMA_BIN_DIR [OLD_TREE] [ROUNDS] [TYPISTS...]
# LLAMA_BIN_DIR holds llama-server and the libllama both sides load (build it from llama-cpp-python's
# sdist, see docs/benchmarks.md). OLD_TREE, if given, is a checkout whose `refact_gguf` serves one
# typist as the baseline ("no slower than before"). One JSON line per run goes to $OUT/cpu_team.jsonl.
set -uo pipefail
M=$1; BIN=$2; OLD=${3:-}; ROUNDS=${4:-2}; shift $(( $# < 4 ? $# : 4 )); TYPISTS=${*:-1 2 4}
OUT=${OUT:-/tmp/cpu_team}; mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export LLAMA_CPP_LIB_PATH=$BIN
source "$(dirname "$0")/wait_up.sh"

run() {  # side typists
    local side=$1 n=$2 pid port=8012
    case $side in
        ours) $PY -m refact_gguf serve -m "$M" -t 2 --parallel "$n" --port $port > "$OUT/server.log" 2>&1 & pid=$! ;;
        old) PYTHONPATH="$OLD" $PY -c "from refact_gguf.cli import main; main()" serve -m "$M" -t 2 --parallel "$n" --port $port > "$OUT/server.log" 2>&1 & pid=$! ;;
        llama-server) port=8089; "$BIN/llama-server" -m "$M" -t 2 -np "$n" -c $((4096 * n)) --no-kv-unified --cache-reuse 256 \
            --spm-infill --port $port > "$OUT/server.log" 2>&1 & pid=$! ;;
    esac
    if wait_up $port; then
        $PY benchmarks/team_replay.py --url "http://127.0.0.1:$port" --typists "$n" --keystrokes 6 --label "$side" --json "$OUT/cpu_team.jsonl"
    else
        echo "$side did not start"; tail -5 "$OUT/server.log"
    fi
    kill $pid; wait $pid 2>/dev/null
}

for round in $(seq "$ROUNDS"); do
    for n in $TYPISTS; do
        sides="ours llama-server"; [ -n "$OLD" ] && [ "$n" = 1 ] && sides="ours old llama-server"
        [ $((round % 2)) = 0 ] && sides=$(echo $sides | tr ' ' '\n' | tac | tr '\n' ' ')
        for side in $sides; do run "$side" "$n"; done
    done
done
