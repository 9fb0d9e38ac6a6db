# Sourced by the scripts: uv, the locked environment, and the model cache seeded from ../shared.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet uv
fi
uv sync --frozen --quiet
# Weights are downloaded by URL into this cache (sha256-checked). Without internet the cache is
# seeded from the shared folder beside the repository, which stands in for the download.
export TTA_SHARED_DIR="${TTA_SHARED_DIR:-$(cd "$ROOT/.." && pwd)/shared}"
export TTA_MODEL_CACHE_DIR="${TTA_MODEL_CACHE_DIR:-$ROOT/.cache/models}"
mkdir -p "$TTA_MODEL_CACHE_DIR"
if [ -d "$TTA_SHARED_DIR/models" ]; then
    for weights in "$TTA_SHARED_DIR"/models/*.th; do
        [ -e "$TTA_MODEL_CACHE_DIR/$(basename "$weights")" ] || cp "$weights" "$TTA_MODEL_CACHE_DIR/"
    done
fi
