# Sourced by the benchmark scripts that start servers: `wait_up PORT [SECONDS]` returns 0 once
# http://127.0.0.1:PORT/health answers (refact-gguf serve and llama-server alike), 1 after SECONDS
# (default 120: a full-size model loading on two cores).
wait_up() {
    local port=$1 tries=$(( ${2:-120} * 4 ))
    for _ in $(seq "$tries"); do
        curl -sf "http://127.0.0.1:$port/health" > /dev/null && return 0
        sleep 0.25
    done
    return 1
}
