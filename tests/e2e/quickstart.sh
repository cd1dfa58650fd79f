#!/usr/bin/env bash
# The README's quick start, verbatim, on a fresh clone: `make serve`, then the README's classify request.
# Exits non-zero unless the server answers POST /v1/classify with predictions.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
port=${QUICKSTART_PORT:-18123}
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
git clone --quiet "$root" "$work/vitserve"
cd "$work/vitserve"
setsid make serve PORT="$port" > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do
    if curl -sf "http://127.0.0.1:$port/v2/health/ready" > /dev/null; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$work/serve.log"; echo "make serve exited" >&2; exit 1; fi
    sleep 1
done
.venv/bin/python -c "from PIL import Image; Image.new('RGB', (320, 240), (200, 30, 30)).save('example.jpg')"
curl -sf -X POST "http://127.0.0.1:$port/v1/classify?top_k=3" -H 'Content-Type: image/jpeg' --data-binary @example.jpg \
    | tee "$work/response.json"
echo
.venv/bin/python -c "import json,sys; r=json.load(open(sys.argv[1])); assert len(r['predictions'])==3 and r['route']['pool']=='global', r" "$work/response.json"
echo "quickstart: make serve answered POST /v1/classify"
