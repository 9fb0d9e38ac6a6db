#!/usr/bin/env bash
# A curl walkthrough of tta-serve: it makes its own images, creates a stream, predicts (image
# files, a raw uint8 tensor, the Open Inference Protocol), reads the drift, and moves the state.
#   ./scripts/serve &            # in another shell: a server on 127.0.0.1:8000
#   examples/curl.sh [URL]       # needs curl and the project's Python (uv run python)
set -euo pipefail
URL="${1:-http://127.0.0.1:8000}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== images: two 32x32 PNGs and one raw uint8 tensor [1, 3, 32, 32] (3,072 bytes)"
uv run python -c "
from PIL import Image
for i, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
    Image.new('RGB', (32, 32), colour).save('$work/image-%d.png' % i)
"
head -c 3072 /dev/urandom > "$work/image.u8"

echo "== create a stream (adabn with its recommended preset)"
curl -sf -X POST "$URL/v1/streams" -H 'content-type: application/json' \
     -d '{"id": "curl-demo", "adapter": "adabn", "ttl_seconds": 3600}'
echo

echo "== predict two image files (multipart, field 'images' repeated)"
curl -sf -X POST "$URL/v1/streams/curl-demo/predict?top_k=2" \
     -F images=@"$work/image-0.png" -F images=@"$work/image-1.png"
echo

echo "== predict a raw uint8 tensor"
curl -sf -X POST "$URL/v1/streams/curl-demo/predict?shape=1,3,32,32&dtype=uint8" \
     -H 'content-type: application/octet-stream' --data-binary @"$work/image.u8"
echo

echo "== the Open Inference Protocol (KServe v2), stream in the X-Stream-Id header"
uv run python -c "
import json
print(json.dumps({'inputs': [{'name': 'input', 'shape': [1, 3, 32, 32], 'datatype': 'UINT8',
                              'data': list(open('$work/image.u8', 'rb').read())}]}))
" > "$work/infer.json"
curl -sf -X POST "$URL/v2/models/cifar10_resnet20/infer" -H 'X-Stream-Id: curl-demo' \
     -H 'content-type: application/json' --data-binary @"$work/infer.json" | head -c 300
echo

echo "== drift"
curl -sf "$URL/v1/streams/curl-demo/drift" | head -c 300
echo

echo "== export the state, reset the stream, import the state back"
curl -sf "$URL/v1/streams/curl-demo/state" -o "$work/curl-demo.safetensors"
curl -sf -X POST "$URL/v1/streams/curl-demo/reset" > /dev/null
curl -sf -X PUT "$URL/v1/streams/curl-demo/state" -H 'content-type: application/octet-stream' \
     --data-binary @"$work/curl-demo.safetensors"
echo

echo "== delete the stream"
curl -sf -X DELETE "$URL/v1/streams/curl-demo" -o /dev/null -w '%{http_code}\n'
