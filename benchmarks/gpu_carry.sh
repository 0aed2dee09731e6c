#!/usr/bin/env bash
# What the GPU scripts carry beside the repository (run here, in the repo's root, before a device call):
#   .whl/   wheels for the GPU machine's Python 3.12 of what its image lacks (KINDS.md lists what it has)
#   .sdist/llama-src.tar.gz   llama-cpp-python's sdist, without llama.cpp's docs, models and benches
#           (under the 64 MiB a call may carry)
# Versions follow this checkout's .venv, so both machines run the same packages.
#   bash benchmarks/gpu_carry.sh && echo '/.whl/' >> .git/info/exclude && echo '/.sdist/' >> .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."
V() { .venv/bin/python -m pip show "$1" | awk '/^Version/{print $2}'; }
rm -rf .whl && mkdir -p .whl .sdist
for pkg in gguf fastapi starlette pydantic pydantic_core typing-inspection annotated-types annotated-doc uvicorn typer \
           huggingface_hub httpx2 httpcore2 truststore hf-xet diskcache anyio opentelemetry-api importlib-metadata; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$pkg$(v=$(V "$pkg" 2>/dev/null || true); [ -n "$v" ] && echo "==$v")"  # not in .venv: the newest
done
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$(V llama_cpp_python)"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src=$(ls -d "$tmp"/llama_cpp_python-*/)
rm -rf "$src"/vendor/llama.cpp/models/* "$src"/vendor/llama.cpp/docs "$src"/vendor/llama.cpp/benches "$src"/docs "$src"/tests
tar czf .sdist/llama-src.tar.gz -C "$tmp" "$(basename "$src")"
rm -rf "$tmp"
du -sh .whl .sdist
