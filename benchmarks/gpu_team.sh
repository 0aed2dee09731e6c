#!/usr/bin/env bash
# The serving engine on the GPU machine (no network), against llama.cpp's own tools, same build:
#   batched: llama-batched-bench -npp 1500 -ntg 16 -npl 1,8,32 (a KV stream per sequence) and
#            `refact-gguf bench --parallel 1,8,32 -p 1500 --n-gen 16`, alternating, 2 rounds;
#   team:    benchmarks/team_replay.py for N = 1, 8, 32 typists against `refact-gguf serve --parallel N`
#            and `llama-server -np N` (4096 tokens per slot, per-slot KV), alternating, a fresh server each run.
#   keystroke: one typist against both servers up at once, ABBA over 6 rounds (benchmarks/keystroke_ab.sh),
#            and decoding at depth 1500: `refact-gguf bench --depth 1500` vs `llama-bench -d 1500`, alternating.
#   matrix:  benchmarks/replay_matrix.sh (issue #25's cells: typists × whole files or 256/64 lines ×
#            together or staggered; ours fresh and over the cache an earlier server left; llama-server)
#   ab:      the matrix's cells (fresh caches) for the checkout's package and for the one carried in .ab/
#            (`git archive BASE refact_gguf models.toml | tar -x -C .ab`: the build before a change), and llama-server,
#            ROUNDS rounds, the three sides' order reversed each round
#   steps:   the engine's tick against a plain decode loop (benchmarks/engine_steps.py), then one typist's
#            steps traced through the server (benchmarks/step_trace.py)
#   bash benchmarks/gpu_team.sh [all|batched|team|keystroke|matrix|ab|steps|setup]     (TYPISTS="1 8" for fewer team sizes)
# llama.cpp is built from the carried sdist into .gpu/ (ignored by git), which a warm machine keeps
# between calls. Needs, carried beside the repo: .whl/ and .sdist/llama-src.tar.gz (docs/benchmarks.md).
STEPS=${1:-all}
W=$PWD/.gpu
mkdir -p "$W"
SRC_ROOT=$W/src
source benchmarks/gpu_env.sh
B=$W/lb/bin
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/steps.log"

if [ ! -x "$B/llama-bench" ]; then
    log "build llama.cpp (CUDA sm_90)"
    cuda_configure "$W/lb" -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON "-DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL" > "$W/build.log" 2>&1
    cmake --build "$W/lb" --target llama llama-server llama-batched-bench llama-bench -j 16 >> "$W/build.log" 2>&1 || { log "build failed"; tail -30 "$W/build.log"; exit 1; }
    log "built"
fi
export LLAMA_CPP_LIB_PATH=$B LD_LIBRARY_PATH=$B

M=$W/m/Refact-1_6B-fim.Q4_K_M.gguf
if [ ! -f "$M" ]; then
    log "full-size synthetic model → Q4_K_M"
    python3 - <<EOF
from pathlib import Path
from refact_gguf import catalog
from refact_gguf.convert import convert
from refact_gguf.convert.synthetic import SyntheticSpec, write_checkpoint
write_checkpoint(Path("/tmp/hf"), SyntheticSpec.full_size(dtype="float16"))
convert(Path("/tmp/hf"), Path("$W/m"), "f16", catalog.load().select("Q4_K_M"), threads=16, use_imatrix=False)  # speed does not depend on it
EOF
    rm -rf /tmp/hf "$W/m/Refact-1_6B-fim.F16.gguf"
    log "model ready"
fi

[ "$STEPS" = setup ] && exit 0
if [ "$STEPS" = matrix ]; then
    log "replay matrix: TYPISTS=${TYPISTS:-1 8 32} FILES=${FILES:-whole window} STARTS=${STARTS:-together staggered}"
    PYTHON=python3 THREADS=16 GPU_LAYERS=99 OUT=$OUT WORK=$W/matrix bash benchmarks/replay_matrix.sh "$M" "$B"
    log "done"
    exit 0
fi
if [ "$STEPS" = ab ]; then
    # -e follows the package's models.toml link: without the file beside it, "before" never starts
    [ -e .ab/refact_gguf/models.toml ] || { log "carry .ab: git archive BASE refact_gguf models.toml | tar -x -C .ab"; exit 1; }
    for round in $(seq "${FIRST_ROUND:-1}" "${ROUNDS:-2}"); do  # FIRST_ROUND: a later call goes on where one stopped
        if [ $((round % 2)) = 1 ]; then order="before after theirs"; else order="theirs after before"; fi
        for side in $order; do
            log "A/B round $round: $side"
            # -P: no cwd first on sys.path, so .ab's package is the one imported
            pp=$PYTHONPATH py=python3; [ $side = before ] && pp=$PWD/.ab:$PYTHONPATH py="python3 -P"
            PYTHONPATH=$pp PYTHON=$py THREADS=16 GPU_LAYERS=99 OUT=$OUT WORK=$W/matrix CACHES=fresh ROUNDS=1 \
                SIDES=$([ $side = theirs ] && echo theirs || echo ours) LABEL="$side r$round" \
                bash benchmarks/replay_matrix.sh "$M" "$B"
        done
    done
    log "done"
    exit 0
fi
if [ "$STEPS" = steps ]; then
    log "engine ticks against a plain decode loop; one typist's steps traced"
    python3 benchmarks/engine_steps.py "$M" --gpu-layers 99 -t 16 --parallel 1 8 32 --depth 2000 | tee "$OUT/engine_steps.txt"
    source "$(dirname "$0")/wait_up.sh"
    rm -rf "$W/kv-trace"
    python3 benchmarks/step_trace.py "$OUT/trace.json" serve -m "$M" --gpu-layers 99 -t 16 --parallel 1 --port 8012 \
        --cache-dir "$W/kv-trace" > "$W/serve.log" 2>&1 &
    pid=$!
    wait_up 8012 60 && python3 benchmarks/team_replay.py --url http://127.0.0.1:8012 --typists 1 --keystrokes 12 \
        --whole-files --budget-ms 500 --label trace > "$OUT/trace_replay.json"
    kill $pid; wait $pid
    python3 benchmarks/step_trace.py "$OUT/trace.json"
    log "done"
    exit 0
fi
if [ "$STEPS" = keystroke ]; then
    log "keystroke: both servers up, ABBA"
    PYTHON=python3 THREADS=16 GPU_LAYERS=99 LS_FLAGS=" " ROUNDS=${ROUNDS:-6} OUT=$OUT/keystroke bash benchmarks/keystroke_ab.sh "$M" "$B"
    cat "$OUT/keystroke/results.jsonl"
    for round in 1 2 3; do
        log "depth 1500 round $round"
        if [ $((round % 2)) = 1 ]; then order="ours theirs"; else order="theirs ours"; fi
        for side in $order; do
            if [ $side = ours ]; then
                python3 -m refact_gguf bench -m "$M" --gpu-layers 99 -t 16 --depth 1500 -p 16 --n-gen 16 -r 5 --json | tee -a "$OUT/depth_ours.json"
            else
                "$B/llama-bench" -m "$M" -ngl 99 -t 16 -p 16 -n 16 -d 1500 -r 5 2>/dev/null | grep "^|" | tee -a "$OUT/depth_llama.md"
            fi
        done
    done
    log "done"
    exit 0
fi
if [ "$STEPS" != team ]; then
    for round in 1 2; do
        for side in ours theirs; do
            [ $round = 2 ] && side=$([ $side = ours ] && echo theirs || echo ours)
            log "batched round $round: $side"
            if [ $side = theirs ]; then
                "$B/llama-batched-bench" -m "$M" -ngl 99 -t 16 -c 49152 -b 2048 -ub 512 --no-kv-unified \
                    -npp 1500 -ntg 16 -npl 1,8,32 2>/dev/null | grep "^|" | tee -a "$OUT/batched_llama.md"
            else
                python3 -m refact_gguf bench -m "$M" --gpu-layers 99 -t 16 --parallel 1,8,32 -p 1500 --n-gen 16 --json \
                    | tee -a "$OUT/batched_ours.json"
            fi
        done
    done
fi
[ "$STEPS" = batched ] && exit 0

source "$(dirname "$0")/wait_up.sh"
for n in ${TYPISTS:-1 8 32}; do
    for round in 1 2; do
        for side in ours theirs; do
            [ $round = 2 ] && side=$([ $side = ours ] && echo theirs || echo ours)
            if [ $side = ours ]; then
                python3 -m refact_gguf serve -m "$M" --gpu-layers 99 -t 16 --parallel $n --queue 64 --port 8012 > "$W/serve.log" 2>&1 &
                port=8012
            else
                "$B/llama-server" -m "$M" -ngl 99 -t 16 -np $n -c $((4096 * n)) --no-kv-unified --cache-reuse 256 \
                    --spm-infill --port 8089 > "$W/llama_server.log" 2>&1 &
                port=8089
            fi
            pid=$!
            if wait_up $port 60; then
                python3 benchmarks/team_replay.py --url "http://127.0.0.1:$port" --typists $n --keystrokes 6 \
                    --label "$side round $round" --json "$OUT/team.jsonl" | tee -a "$OUT/steps.log"
            else
                log "$side did not start"; tail -5 "$W/serve.log" "$W/llama_server.log"
            fi
            kill $pid; wait $pid 2>/dev/null
        done
    done
done
log "done"
