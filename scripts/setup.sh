#!/usr/bin/env bash
# Set up refact-gguf in ./.venv: llama-cpp-python built for this CPU, then the package itself.
#
#   bash scripts/setup.sh          # the tool
#   bash scripts/setup.sh --dev    # + test dependencies (pytest, tokenizers; torch when a local wheel exists)
#
# GPU: CMAKE_ARGS="-DGGML_CUDA=on" bash scripts/setup.sh   (flags below are added to yours)
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON="llama-cpp-python==0.3.36"
PY="${PYTHON:-python3}"
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1

say() { printf '\033[1m[setup]\033[0m %s\n' "$*" >&2; }

# Run "$@", saying every 30 s that it is still at work (a compile is otherwise silent for minutes).
working() {
    local label=$1; shift
    "$@" & local pid=$! start=$SECONDS next=30
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        if (( SECONDS - start >= next )); then
            say "$label: still working, $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
            next=$(( next + 30 ))
        fi
    done
    wait "$pid"
}

[ -x .venv/bin/python ] || { say "creating .venv"; "$PY" -m venv .venv; }
VPY=.venv/bin/python
$VPY -m pip install -q -U pip

# llama.cpp's AMX kernels segfault on AMX CPUs (llama.cpp#20824): build without AMX there, and only there.
source scripts/no_amx.sh
if [ -n "$NO_AMX" ]; then
    export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_C_FLAGS=\"$NO_AMX\" -DCMAKE_CXX_FLAGS=\"$NO_AMX\""
    say "AMX CPU: building llama.cpp without AMX (CMAKE_ARGS=$CMAKE_ARGS)"
fi

# A CUDA build links CUDA's static runtime into libggml-cuda.so and (CUDA 13) exports a second copy
# of libstdc++ from it; libllama's std::regex then crashes while loading a model, depending on
# import order. Keep what static archives bring in private to the library.
if [[ "${CMAKE_ARGS:-}" =~ GGML_CUDA=(on|ON|On|1|true|TRUE) ]]; then
    export CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL"
    say "CUDA build: static runtime symbols kept private (CMAKE_ARGS=$CMAKE_ARGS)"
fi

if ! $VPY -c "import llama_cpp" 2>/dev/null; then
    say "installing $LLAMA_CPP_PYTHON (compiles llama.cpp: about 5 minutes on 2 cores, once)"
    working "compiling llama.cpp" $VPY -m pip install -q "$LLAMA_CPP_PYTHON"
fi
say "installing refact-gguf"
if [ $DEV = 1 ]; then $VPY -m pip install -q -e ".[test]"; else $VPY -m pip install -q -e .; fi

# pip's wheel cache ignores CMAKE_ARGS: a wheel built with other flags (or on another CPU) is
# reused silently. Check what we got against this machine, and rebuild once if it is wrong.
if ! $VPY -m refact_gguf.loader >/dev/null; then
    say "the installed llama.cpp does not suit this CPU: rebuilding without pip's cache"
    working "compiling llama.cpp" $VPY -m pip install -q --no-cache-dir --force-reinstall --no-deps "$LLAMA_CPP_PYTHON"
    $VPY -m refact_gguf.loader >/dev/null
fi

if [ $DEV = 1 ] && ! $VPY -c "import torch" 2>/dev/null; then
    # torch only serves the pytorch_model.bin test; take it only from a local wheel (PIP_FIND_LINKS),
    # never a multi-GB download.
    wheel=$(for d in ${PIP_FIND_LINKS:-}; do ls "$d"/torch-*+cpu-*.whl 2>/dev/null; done | head -n 1 || true)
    if [ -n "$wheel" ]; then
        say "installing torch from $wheel (for the pytorch_model.bin test)"
        $VPY -m pip install -q "$wheel" || say "torch install failed: that test will be skipped"
    else
        say "no local torch wheel: the pytorch_model.bin test will be skipped"
    fi
fi
say "ready: .venv/bin/refact-gguf --help"
