#!/usr/bin/env bash
# Drafting (`serve --draft K`, issue #29) on the GPU machine, against llama-server's n-gram
# speculation on the same GGUF and build. Two calls, because the stand-in's GGUF and llama.cpp's
# sources do not fit in one call's 64 MiB:
#   bash benchmarks/gpu_draft.sh synthetic   (carry .whl .sdist) builds as gpu_team.sh does, then on the
#       full-size synthetic model: what a verify step of 1+k tokens costs against a one-token step
#       (benchmarks/draft.py cost), and 1 and 32 typists with --draft 4 against --draft 0
#       (benchmarks/draft_replay.sh; random weights keep few drafts, so the gate must make it cost nothing);
#   bash benchmarks/gpu_draft.sh standin     (carry .standin: the stand-in's Q4_K_M, made here with
#       `refact-gguf convert ../shared/standin`) on the warm machine: draft.py fim (acceptance, the
#       same text), then benchmarks/draft_replay.sh (one typist retyping real lines, and 32 typists,
#       against ours --draft 0/4/8 and llama-server without and with n-gram speculation).
STEP=${1:-synthetic}
W=$PWD/.gpu
source benchmarks/gpu_env.sh
B=$W/lb/bin
export LLAMA_CPP_LIB_PATH=$B LD_LIBRARY_PATH=$B
if [ "$STEP" = synthetic ]; then
    bash benchmarks/gpu_team.sh setup || exit 1
    M=$W/m/Refact-1_6B-fim.Q4_K_M.gguf
    log "verify step cost, full-size synthetic Q4_K_M"
    for depth in 200 1500 3000; do
        python3 benchmarks/draft.py -m "$M" --gpu-layers 99 --threads 16 --modes cost --ks 1,2,3,4,6,8,12,16 \
            --depth $depth --reps 20 | tee -a "$OUT/draft_cost.jsonl"
    done
    log "ours --draft 4 against --draft 0: 1 and 32 typists"
    PYTHON=python3 THREADS=16 GPU_LAYERS=99 SIDES="ours:0;ours:4" TEAM_SIDES="ours:0;ours:4" FILES=2 ROUNDS=2 TEAM=32 \
        OUT=$OUT bash benchmarks/draft_replay.sh "$M" "$B" | tee -a "$OUT/steps.log"
    log "done"
    exit 0
fi

SI=.standin/Refact-1_6B-fim.Q4_K_M.gguf
[ -f "$SI" ] || { log "carry .standin (the stand-in's Q4_K_M)"; exit 1; }
log "draft.py on the stand-in"
python3 benchmarks/draft.py -m "$SI" --gpu-layers 99 --threads 16 --modes cost,fim --ks 2,4,8 --files 8 --rounds 2 \
    | tee -a "$OUT/draft_fim.jsonl"
log "one typist and a team, side by side with llama-server's n-gram speculation"
PYTHON=python3 THREADS=16 GPU_LAYERS=99 TEAM=32 OUT=$OUT bash benchmarks/draft_replay.sh "$SI" "$B" | tee -a "$OUT/steps.log"
log "done"
