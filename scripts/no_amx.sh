# Sourced: NO_AMX holds the compiler flags that build llama.cpp without AMX on a CPU that has it
# (llama.cpp's AMX kernels segfault there on K-quants, llama.cpp#20824), and is empty elsewhere:
# the flags are x86-only, and every other feature (AVX-512, VNNI, repacking) stays.
NO_AMX=""
if [ "$(uname -m)" = "x86_64" ] && grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
