#!/usr/bin/env bash
# The GPU checks of the sync / compile / channels-last work in one short run (at most ~9
# minutes, usually less): real host-device syncs per step of each plugin loop
# (torch.cuda.set_sync_debug_mode), eager vs torch.compile on ViT-B/32 (Triton; compile time
# apart, weights trainable and frozen), and channels-last. JSON goes to $OUT
# (default ./gpu-speed). Written without a GPU at hand: not yet run on one.
#
#     bash benchmarks/gpu_speed.sh      # from the repository root, mmsec installed
set -u
OUT="${OUT:-gpu-speed}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
export MMSEC_PROGRESS=0 MMSEC_CACHE_DIR="${MMSEC_CACHE_DIR:-/tmp/mmsec-gpu-cache}"
status=0
timeout 150 python "$HERE/syncs.py" --device cuda > "$OUT/syncs.json" 2> "$OUT/syncs.log" \
    || status=1
timeout 300 python "$HERE/compile.py" --device cuda --models ViT-B-32 --repeat 2 \
    > "$OUT/compile.json" 2> "$OUT/compile.log" || status=1
timeout 90 python "$HERE/channels_last.py" --device cuda --models ViT-B-32,zoo:shapes \
    --repeat 2 > "$OUT/channels_last.json" 2> "$OUT/channels_last.log" || status=1
grep -h "syncs/step" "$OUT/syncs.log"
grep -h "^{'model" "$OUT/compile.json" "$OUT/channels_last.json"
exit $status
