#!/bin/sh
# Expert-server entrypoint: download the vindex on first boot, then exec larql-server.
#
# Environment (the names the seed's deployment used):
#   EXPERTS      expert range this shard owns, e.g. "0-63"; empty = all experts
#   LAYERS       layer range, e.g. "0-14"; empty = all layers
#   WARMUP       "1" pre-faults the owned experts' pages before accepting traffic
#   HF_REPO      Hugging Face repo holding the vindex
#   VINDEX_PATH  where the vindex lives on the persistent volume (default /data/vindex)
#   PORT         TCP port (default 8080)
#   HF_TOKEN     read by huggingface_hub for private or gated repos
#   THREADS      kernel threads (default: all cores); WORKERS concurrent computations (default 2)
#   LARQL_API_KEY  the shard's API key (a fly secret); without it the server refuses to listen
#                on 0.0.0.0 unless ALLOW_ANONYMOUS=1 (a private network only)
#   TLS_CERT, TLS_KEY  PEM files for TLS in the server itself (not needed behind fly's tls handler)
set -eu

VINDEX_PATH="${VINDEX_PATH:-/data/vindex}"
HF_REPO="${HF_REPO:-chrishayuk/gemma-4-26b-a4b-it-vindex-expert-server}"
PORT="${PORT:-8080}"
EXPERTS="${EXPERTS:-}"
LAYERS="${LAYERS:-}"
WARMUP="${WARMUP:-0}"

if [ ! -f "$VINDEX_PATH/index.json" ]; then
    echo "larql-entrypoint: no vindex at $VINDEX_PATH; pulling $HF_REPO (first boot)"
    # The server reads only index.json, the manifests, norms.bin and layers/ (the `experts`
    # preset; ~1.8 GB less than `expert-server`); with LAYERS set, only those layers' files.
    set -- "$HF_REPO" -o "$VINDEX_PATH" --preset "${PULL_PRESET:-experts}"
    [ -n "$LAYERS" ] && set -- "$@" --layers "$LAYERS"
    larql pull "$@"
fi

set -- "$VINDEX_PATH" --host "${HOST:-0.0.0.0}" --port "$PORT"
[ -n "$EXPERTS" ] && set -- "$@" --experts "$EXPERTS"
[ -n "$LAYERS" ] && set -- "$@" --layers "$LAYERS"
case "$WARMUP" in 1|true|yes) set -- "$@" --warmup ;; esac
[ -n "${THREADS:-}" ] && set -- "$@" --threads "$THREADS"
[ -n "${WORKERS:-}" ] && set -- "$@" --workers "$WORKERS"
[ -n "${TLS_CERT:-}" ] && set -- "$@" --tls-cert "$TLS_CERT" --tls-key "${TLS_KEY:?TLS_KEY must be set with TLS_CERT}"
case "${ALLOW_ANONYMOUS:-0}" in 1|true|yes) set -- "$@" --allow-anonymous ;; esac

echo "larql-entrypoint: exec larql-server $*"
exec larql-server "$@"
