#!/usr/bin/env bash
# The README's quick start, verbatim, on a fresh clone: `make serve`, then the README's classify request.
# Exits non-zero unless the server answers POST /v1/classify with predictions, and prints the seconds
# from `make serve` to that first answer, split into install, export and start-up (from the times at
# which make started each command). QUICKSTART_LOG=FILE keeps the timestamped `make serve` log.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
port=${QUICKSTART_PORT:-18123}
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    if [ -n "${QUICKSTART_LOG:-}" ]; then cp "$work/serve.log" "$QUICKSTART_LOG" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
git clone --quiet "$root" "$work/vitserve"
cd "$work/vitserve"
started=$(date +%s.%N)
# Each output line gets the time it was written, so the phases can be read off make's echoed commands.
setsid bash -c 'make serve PORT="$1" 2>&1 | while IFS= read -r line; do printf "%s %s\n" "$(date +%s.%N)" "$line"; done' \
    _ "$port" > "$work/serve.log" &
pid=$!
# The reader's example.jpg exists before the server is up; here it is drawn with the virtualenv's
# Pillow as soon as the install is done, so the first request's time is the server's alone.
example() { .venv/bin/python -c "from PIL import Image; Image.new('RGB', (320, 240), (200, 30, 30)).save('example.jpg')"; }
limit=$(( $(date +%s) + ${QUICKSTART_TIMEOUT_S:-1800} ))
until curl -sf "http://127.0.0.1:$port/v2/health/ready" > /dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then cat "$work/serve.log"; echo "make serve exited" >&2; exit 1; fi
    if [ "$(date +%s)" -gt "$limit" ]; then tail -50 "$work/serve.log"; echo "not ready after ${QUICKSTART_TIMEOUT_S:-1800} s" >&2; exit 1; fi
    if [ ! -e example.jpg ] && [ -e .venv/.installed ]; then example; fi
    sleep 0.5
done
[ -e example.jpg ] || example
curl -sf -X POST "http://127.0.0.1:$port/v1/classify?top_k=3" -H 'Content-Type: image/jpeg' --data-binary @example.jpg \
    | tee "$work/response.json"
answered=$(date +%s.%N)
echo
.venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); assert len(r['predictions'])==3 and r['route']['pool']=='global', r" "$work/response.json"
awk -v started="$started" -v answered="$answered" '
    !first_export && / -m service.cli export / { first_export = $1 }
    !serve && / -m service.cli serve / { serve = $1 }
    END {
        exported = first_export ? first_export : serve
        printf "quickstart: install %.1f s, export %.1f s, start-up and first request %.1f s\n", \
            exported - started, serve - exported, answered - serve
        printf "quickstart: make serve answered POST /v1/classify after %.1f s\n", answered - started
    }' "$work/serve.log"
