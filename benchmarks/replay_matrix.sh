#!/usr/bin/env bash
# The replay matrix of issue #25, run before a team or keystroke figure is claimed: every cell
# against refact-gguf serve and llama-server on one GGUF and one llama.cpp build (LLAMA_CPP_LIB_PATH),
# the same client (benchmarks/team_replay.py, greedy, n_predict 16), sides alternating by round.
#   cells: TYPISTS × FILES (window: llama.vim's 256/64 lines; whole: the whole file, prompts up to the
#          context) × STARTS (together; staggered: typist i starts i × STAGGER_MS late; switch: together,
#          in a file, then in another, then back in the first, on one server)
#   ours per cell, CACHES of: fresh (an empty cache directory), warm (a new server over the directory
#   the fresh one left: an editor restarted next morning), midrun (a server over a fresh directory
#   stopped after everyone's cold keystroke, their files still going in, then a new one over what it
#   left: a restart mid-run); default "fresh warm". llama-server keeps no cache across restarts: once per cell.
#   THREADS=16 GPU_LAYERS=99 TYPISTS="1 8 32" bash benchmarks/replay_matrix.sh MODEL.gguf LLAMA_BIN_DIR   # a GPU
#   THREADS=2 TYPISTS="1 4 8" BUDGET_MS=500 bash benchmarks/replay_matrix.sh MODEL.gguf LLAMA_BIN_DIR     # a laptop
# PAUSE_MS: between an answer and the next keystroke (default 0: back to back, the hardest case).
# SIDES: "ours theirs" (default), or one of them; LABEL: a word before each run's label (A/B runs of
# two builds of ours: benchmarks/gpu_team.sh ab).
# One JSON line a run in $OUT/matrix.jsonl (label: side cache typists files start round), with the
# engine's counters per warm keystroke for ours (saves, restores, short answers, background tokens).
set -u
M=$1; BIN=$2
PY=${PYTHON:-.venv/bin/python}
T=${THREADS:-2}; NGL=${GPU_LAYERS:-0}
OUT=${OUT:-/tmp/replay_matrix}; mkdir -p "$OUT"
W=${WORK:-/tmp/replay_matrix_work}; mkdir -p "$W"
export LLAMA_CPP_LIB_PATH=$BIN
source "$(dirname "$0")/wait_up.sh"

one() {  # side cache n files start round
    local side=$1 cache=$2 n=$3 files=$4 start=$5 round=$6 port pid
    local kv="$W/kv-$n-$files-$start"
    [ "$cache" = fresh ] || [ "$cache" = midrun ] && rm -rf "$kv"
    [ "$cache" = midrun ] && KEYSTROKES=0 JSON=$W/midrun-first.jsonl one ours first "$n" "$files" "$start" "$round"
    if [ "$side" = ours ]; then
        port=8012
        $PY -m refact_gguf serve -m "$M" -t "$T" --gpu-layers "$NGL" --parallel "$n" --queue 64 --port $port \
            --cache-dir "$kv" > "$W/ours.log" 2>&1 & pid=$!
    else
        port=8089
        # shellcheck disable=SC2086  # LS_FLAGS holds several flags (e.g. "-b 4096": /infill then keeps a whole
        # file's ~4,000 tokens as ours does, instead of 3/4 of its default 2,048-token batch)
        "$BIN/llama-server" -m "$M" -t "$T" -ngl "$NGL" -np "$n" -c $((4096 * n)) --no-kv-unified --cache-reuse 256 \
            --spm-infill ${LS_FLAGS:-} --port $port > "$W/llama-server.log" 2>&1 & pid=$!
    fi
    if wait_up $port; then
        # switch: everyone types in a file, then in another, then back in the first (return visits)
        local visit visits="0:"; [ "$start" = switch ] && visits="0:-first 1:-other 0:-back"  # file offset:label
        for visit in $visits; do
            # shellcheck disable=SC2046  # the options are words
            $PY benchmarks/team_replay.py --url "http://127.0.0.1:$port" --typists "$n" --keystrokes "${KEYSTROKES:-6}" \
                --budget-ms "${BUDGET_MS:-600000}" $([ "$files" = whole ] && echo --whole-files) \
                --stagger-ms $([ "$start" = staggered ] && echo "${STAGGER_MS:-10}" || echo 0) --pause-ms "${PAUSE_MS:-0}" \
                --file-offset "${visit%%:*}" --label "${LABEL:+$LABEL }$side $cache n=$n $files $start${visit#*:} r$round" \
                --json "${JSON:-$OUT/matrix.jsonl}"
        done
    else
        echo "$side did not start"; tail -n 5 "$W"/*.log
    fi
    kill -TERM $pid; wait $pid 2>/dev/null  # ours writes its caches to disk here
}

for n in ${TYPISTS:-1 8 32}; do
    for files in ${FILES:-whole window}; do
        for start in ${STARTS:-together staggered}; do
            for round in $(seq "${ROUNDS:-1}"); do
                if [ $((round % 2)) = 1 ]; then order="ours theirs"; else order="theirs ours"; fi
                for side in $order; do
                    [[ " ${SIDES:-ours theirs} " == *" $side "* ]] || continue
                    if [ "$side" = ours ]; then
                        for cache in ${CACHES:-fresh warm}; do one ours "$cache" "$n" "$files" "$start" "$round"; done
                    else
                        one theirs fresh "$n" "$files" "$start" "$round"
                    fi
                done
            done
        done
    done
done
