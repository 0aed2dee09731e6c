# What every GPU benchmark script starts with; sourced from the repository's root on the GPU machine,
# with .whl/ and .sdist/llama-src.tar.gz carried beside the repo (docs/benchmarks.md). Sets OUT, T0,
# log, PYTHONPATH (the carried wheels, the repo, llama-cpp-python from the sdist) and SRC (llama.cpp's
# sources, unpacked once under SRC_ROOT, default /tmp/src), and defines cuda_configure BUILD_DIR
# [CMAKE_FLAGS…]: a shared-library CUDA build for the H100 (sm_90). Callers add
# -DCMAKE_SHARED_LINKER_FLAGS=-Wl,--exclude-libs,ALL (gpu_cuda_libstdcxx.sh says why) and the tools.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(($(date +%s) - T0))s] $*" | tee -a "$OUT/steps.log"; }
# A later call on the warm machine may carry other things instead (gpu_draft.sh): the wheels stay installed.
[ -d /tmp/site ] && [ ! -d .whl ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
SRC_ROOT=${SRC_ROOT:-/tmp/src}
[ -d "$SRC_ROOT/llama_cpp_python-0.3.36" ] || { mkdir -p "$SRC_ROOT" && tar xzf .sdist/llama-src.tar.gz -C "$SRC_ROOT"; }
export PYTHONPATH="/tmp/site:$PWD:$SRC_ROOT/llama_cpp_python-0.3.36"
export SRC=$SRC_ROOT/llama_cpp_python-0.3.36/vendor/llama.cpp
# The host CPU has AMX: built as scripts/setup.sh builds it there (no AMX, llama.cpp#20824), so the
# measured build is the one users run and `bench` does not warn.
source scripts/no_amx.sh
export NO_AMX  # cuda_configure is exported to child shells too
cuda_configure() {
    local dir=$1
    shift
    cmake -S "$SRC" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF \
        "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX" "$@"
}
export -f cuda_configure
