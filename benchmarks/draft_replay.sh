#!/usr/bin/env bash
# Drafting side by side (issue #29): one typist retyping real lines (team_replay --retype: the file's
# own line at the cursor, so a trained model can predict what follows) in FILES different files, at
# n_predict 16 and 48, against refact-gguf serve --draft 0/4/8 and llama-server without and with its
# n-gram speculation, one GGUF, one llama.cpp build, a fresh server per side, sides alternating by
# round; then TEAM typists (whole files) against ours --draft 0/4 and llama-server, none and n-gram.
#   THREADS=2 bash benchmarks/draft_replay.sh STANDIN.gguf LLAMA_BIN_DIR                 # a laptop
#   THREADS=16 GPU_LAYERS=99 TEAM=32 bash benchmarks/draft_replay.sh STANDIN.gguf BIN    # a GPU
# SIDES / TEAM_SIDES: ';'-separated "ours:K" and "ls:FLAGS" (default: the sides above); ROUNDS (3),
# TEAM_ROUNDS (2), FILES (4), TEAM (8 typists; 0: no team).
# One JSON line a replay in $OUT/draft_replay.jsonl (warm_drafted / warm_draft_accepted: what each
# side drafted and kept; warm_ms_per_token beside the keystroke, since the servers stop differently).
set -u
M=$1; BIN=$2
PY=${PYTHON:-.venv/bin/python}
T=${THREADS:-2}; NGL=${GPU_LAYERS:-0}
OUT=${OUT:-/tmp/draft_replay}; mkdir -p "$OUT"
export LLAMA_CPP_LIB_PATH=$BIN
source "$(dirname "$0")/wait_up.sh"
NGRAM="--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 8"

serve() {  # "ours:K" (--draft K) or "ls:FLAGS" (llama-server), typists
    local side=$1 n=$2
    if [ "${side%%:*}" = ours ]; then
        $PY -m refact_gguf serve -m "$M" --gpu-layers "$NGL" -t "$T" --parallel "$n" --queue 64 --port 8012 \
            --cache-disk-mb 0 --draft "${side#*:}" > "$OUT/server.log" 2>&1 &
    else
        # shellcheck disable=SC2086  # the side's flags are words
        "$BIN/llama-server" -m "$M" -ngl "$NGL" -t "$T" -np "$n" -c $((4096 * n)) --no-kv-unified --cache-reuse 256 \
            --spm-infill ${side#*:} --port 8012 > "$OUT/server.log" 2>&1 &
    fi
    pid=$!
    wait_up 8012 || { echo "$side did not start"; tail -5 "$OUT/server.log"; }
}

replay() {  # label typists [team_replay options…]
    local label=$1 n=$2
    shift 2
    $PY benchmarks/team_replay.py --url http://127.0.0.1:8012 --typists "$n" --label "$label" --retype \
        --json "$OUT/draft_replay.jsonl" "$@"
}

MAP_K="--spec-type ngram-map-k --spec-ngram-map-k-size-n 3 --spec-ngram-map-k-size-m 8"
IFS=';' read -ra SIDES <<< "${SIDES:-ours:0;ours:4;ours:8;ls:;ls:$NGRAM;ls:--spec-type ngram-simple;ls:$MAP_K;ls:--spec-type ngram-mod}"
IFS=';' read -ra TEAM_SIDES <<< "${TEAM_SIDES:-ours:0;ours:4;ls:;ls:$NGRAM}"
count=${#SIDES[@]}
for round in $(seq "${ROUNDS:-3}"); do
    for i in $(seq 0 $((count - 1))); do
        side=${SIDES[$(( round % 2 == 1 ? i : count - 1 - i ))]}
        serve "$side" 1
        for file in $(seq 0 $((${FILES:-4} - 1))); do
            for np in 16 48; do
                replay "n=1 [$side] file=$file np=$np r$round" 1 --keystrokes 8 --n-predict $np --file-offset $((file * 20))
            done
        done
        kill $pid; wait $pid 2>/dev/null
    done
done
[ "${TEAM:-8}" = 0 ] && exit 0
for round in $(seq "${TEAM_ROUNDS:-2}"); do
    for side in "${TEAM_SIDES[@]}"; do
        serve "$side" "${TEAM:-8}"
        replay "n=${TEAM:-8} [$side] whole r$round" "${TEAM:-8}" --whole-files --keystrokes 6
        kill $pid; wait $pid 2>/dev/null
    done
done
