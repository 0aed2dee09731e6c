#!/usr/bin/env bash
# benchmarks/file_switch.py on this CPU for refact-gguf serve and llama-server: same GGUF, same
# llama.cpp build (LLAMA_CPP_LIB_PATH), same client and settings, 2 threads each, one after the
# other (order alternating by round), a fresh, empty KV cache directory for each refact-gguf run:
#   bash benchmarks/cpu_file_switch.sh MODEL.gguf LLAMA_BIN_DIR [ROUNDS] [-- file_switch.py options]
set -uo pipefail
M=$1; BIN=$2; ROUNDS=${3:-1}; shift $(( $# < 3 ? $# : 3 )); [ "${1:-}" = "--" ] && shift
OUT=${OUT:-/tmp/file_switch}; mkdir -p "$OUT"
PY=${PYTHON:-.venv/bin/python}
export LLAMA_CPP_LIB_PATH=$BIN
for round in $(seq "$ROUNDS"); do
    sides="ours llama-server"; [ $((round % 2)) = 0 ] && sides="llama-server ours"
    for side in $sides; do
        case $side in
            ours) rm -rf "$OUT/kv"; cmd="$PY -m refact_gguf serve -m $M -t 2 --port 8012 --cache-dir $OUT/kv"; port=8012 ;;
            llama-server) cmd="$BIN/llama-server -m $M -t 2 -c 4096 --cache-reuse 256 --spm-infill --port 8013"; port=8013 ;;
        esac
        $PY benchmarks/file_switch.py --server "$cmd" --port $port --label "$side-r$round" --out "$OUT" "$@"
    done
done
