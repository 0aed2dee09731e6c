#!/usr/bin/env bash
# Drafting (`serve --draft K`, issue #29) on the GPU machine, against llama-server's n-gram
# speculation on the same GGUF and build. Two calls, because the stand-in's GGUF and llama.cpp's
# sources do not fit in one call's 64 MiB:
#   bash benchmarks/gpu_draft.sh synthetic   (carry .whl .sdist) builds as gpu_team.sh does, then on the
#       full-size synthetic model: what a verify step of 1+k tokens costs against a one-token step
#       (benchmarks/draft.py cost), and 1 and 32 typists with --draft 4 against --draft 0
#       (random weights: nothing is kept, so the gate must make it cost nothing);
#   bash benchmarks/gpu_draft.sh standin     (carry .standin: the stand-in's Q4_K_M, made here with
#       `refact-gguf convert ../shared/standin`) on the warm machine: draft.py fim (acceptance, the
#       same text), then one typist retyping real lines (team_replay --retype, 4 files, n_predict 16
#       and 48) against ours --draft 0/4/8 and llama-server without and with n-gram speculation, sides
#       alternating by round; then 32 typists, ours --draft 0/4 and llama-server.
STEP=${1:-synthetic}
W=$PWD/.gpu
source benchmarks/gpu_env.sh
B=$W/lb/bin
export LLAMA_CPP_LIB_PATH=$B LD_LIBRARY_PATH=$B
wait_up() { for _ in $(seq 240); do curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0; sleep 0.25; done; return 1; }

serve() {  # side model typists: a server on 8012 (ours: draft=K; ls: llama-server, K is its flags)
    local side=$1 m=$2 n=$3
    if [ "${side%%:*}" = ours ]; then
        python3 -m refact_gguf serve -m "$m" --gpu-layers 99 -t 16 --parallel "$n" --queue 64 --port 8012 \
            --cache-disk-mb 0 --draft "${side#*:}" > "$W/serve.log" 2>&1 &
    else
        # shellcheck disable=SC2086  # the side's flags are words
        "$B/llama-server" -m "$m" -ngl 99 -t 16 -np "$n" -c $((4096 * n)) --no-kv-unified --cache-reuse 256 \
            --spm-infill ${side#*:} --port 8012 > "$W/serve.log" 2>&1 &
    fi
    pid=$!
    wait_up 8012 || { log "$side did not start"; tail -5 "$W/serve.log"; }
}

replays() {  # label typists [team_replay options…]
    local label=$1 n=$2
    shift 2
    python3 benchmarks/team_replay.py --url http://127.0.0.1:8012 --typists "$n" --label "$label" \
        --json "$OUT/draft_replay.jsonl" "$@" | tee -a "$OUT/steps.log"
}

if [ "$STEP" = synthetic ]; then
    bash benchmarks/gpu_team.sh setup || exit 1
    M=$W/m/Refact-1_6B-fim.Q4_K_M.gguf
    log "verify step cost, full-size synthetic Q4_K_M"
    for depth in 200 1500 3000; do
        python3 benchmarks/draft.py -m "$M" --gpu-layers 99 --threads 16 --modes cost --ks 1,2,3,4,6,8,12,16 \
            --depth $depth --reps 20 | tee -a "$OUT/draft_cost.jsonl"
    done
    for n in 1 32; do
        for round in 1 2; do
            if [ $round = 1 ]; then order="0 4"; else order="4 0"; fi
            for k in $order; do
                serve "ours:$k" "$M" $n
                for files in window whole; do
                    replays "synthetic ours draft=$k n=$n $files r$round" $n --keystrokes 8 \
                        $([ $files = whole ] && echo --whole-files)
                done
                kill $pid; wait $pid 2>/dev/null
            done
        done
    done
    log "done"
    exit 0
fi

SI=.standin/Refact-1_6B-fim.Q4_K_M.gguf
[ -f "$SI" ] || { log "carry .standin (the stand-in's Q4_K_M)"; exit 1; }
log "draft.py fim on the stand-in"
python3 benchmarks/draft.py -m "$SI" --gpu-layers 99 --threads 16 --modes cost,fim --ks 2,4,8 --files 8 --rounds 2 \
    | tee -a "$OUT/draft_fim.jsonl"
SIDES=("ours:0" "ours:4" "ours:8" "ls:" "ls:--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 8"
       "ls:--spec-type ngram-simple" "ls:--spec-type ngram-map-k --spec-ngram-map-k-size-n 3 --spec-ngram-map-k-size-m 8"
       "ls:--spec-type ngram-mod")
for round in 1 2 3; do
    count=${#SIDES[@]}
    for i in $(seq 0 $((count - 1))); do
        side=${SIDES[$(( round % 2 == 1 ? i : count - 1 - i ))]}
        serve "$side" "$SI" 1
        for offset in 0 20 40 60; do
            for np in 16 48; do
                replays "standin n=1 [$side] off=$offset np=$np r$round" 1 --retype --keystrokes 8 --n-predict $np --file-offset $offset
            done
        done
        kill $pid; wait $pid 2>/dev/null
    done
done
for round in 1 2; do
    for side in "ours:0" "ours:4" "ls:" "ls:--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 8"; do
        serve "$side" "$SI" 32
        replays "standin n=32 [$side] whole r$round" 32 --retype --whole-files --keystrokes 6
        kill $pid; wait $pid 2>/dev/null
    done
done
log "done"
