#!/usr/bin/env bash
# Continue's own client code against `refact-gguf serve`: its CLI (`cn`, @continuedev/cli from npm,
# the same model providers as the VS Code extension) asks one question through the Ollama provider
# and one through the OpenAI provider, with docs/editors.md's settings. Autocomplete runs only inside
# the editor, so it is not covered. Needs node >= 20 and npm; installs the CLI into a temporary dir.
#   bash benchmarks/editor_continue.sh MODEL.gguf [CN_VERSION]
set -euo pipefail
M=$1; V=${2:-1.5.47}
PY=${PYTHON:-.venv/bin/python}
W=$(mktemp -d); PORT=${PORT:-8013}
trap 'kill $pid 2>/dev/null; rm -rf "$W"' EXIT
npm install --silent --prefix "$W" "@continuedev/cli@$V" > /dev/null
$PY -m refact_gguf serve -m "$M" --port "$PORT" --cache-disk-mb 0 --log-requests > "$W/serve.log" 2>&1 & pid=$!
source "$(dirname "$0")/wait_up.sh"
wait_up "$PORT" || { echo "the server did not start"; tail -5 "$W/serve.log"; exit 1; }
status=0
for provider in ollama openai; do
    base="http://127.0.0.1:$PORT"; [ $provider = openai ] && base="$base/v1"
    printf 'name: refact-gguf\nversion: 1.0.0\nschema: v1\nmodels:\n  - name: Refact 1.6B\n    provider: %s\n    model: %s\n    apiBase: %s\n    apiKey: none\n    roles: [chat]\n' \
        "$provider" "$(basename "$M" .gguf)" "$base" > "$W/$provider.yaml"
    if HOME=$W timeout 600 "$W/node_modules/.bin/cn" --config "$W/$provider.yaml" -p "Write a Python function that adds two numbers." > "$W/$provider.out" 2>&1; then
        echo "{\"client\": \"continue cn $V\", \"provider\": \"$provider\", \"ok\": true, \"answer_chars\": $(wc -c < "$W/$provider.out")}"
    else
        status=1; echo "{\"client\": \"continue cn $V\", \"provider\": \"$provider\", \"ok\": false}"; tail -3 "$W/$provider.out"
    fi
done
grep -E "POST .* (200|4..|5..) " "$W/serve.log" || true
exit $status
