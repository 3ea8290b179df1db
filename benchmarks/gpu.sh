#!/usr/bin/env bash
# The GPU figures of issue 16 in one short run (about 5-8 minutes on one H100/H200): every
# loop of the suite at its CUDA sizes on a random-weight open_clip ViT-B/32, then the
# training loops again on ViT-B/16, each with its fp32 and bf16 ceilings measured in the
# same process. JSON per benchmark and a markdown table go to $OUT (default ./gpu-bench).
#
#     bash benchmarks/gpu.sh            # from the repository root, mmsec installed
#
# Nothing is downloaded: models have random weights (throughput does not depend on them).
set -u
OUT="${OUT:-gpu-bench}"
HERE="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$OUT"
export MMSEC_PROGRESS=0 MMSEC_CACHE_DIR="${MMSEC_CACHE_DIR:-/tmp/mmsec-gpu-cache}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, open_clip; print(torch.__version__, torch.version.cuda, open_clip.__version__)" \
    >> "$OUT/gpu.txt" 2>&1
# the 32-px procedural train split (the main job's data) is rendered once, off the clock
python -c "from mmsec.data import procedural_shapes; procedural_shapes(split='train')" \
    >> "$OUT/gpu.txt" 2>&1
status=0
timeout 300 python "$HERE/run_all.py" --device cuda --model ViT-B-32 --repeat 2 --timeout 100 \
    --out "$OUT/vit-b-32" > "$OUT/table-vit-b-32.md" 2> "$OUT/log-vit-b-32.txt" || status=1
timeout 130 python "$HERE/run_all.py" --device cuda --model ViT-B-16 --repeat 1 --timeout 60 \
    --only advclip,uap,pgd_eval,fare,cache_encode --out "$OUT/vit-b-16" \
    > "$OUT/table-vit-b-16.md" 2> "$OUT/log-vit-b-16.txt" || status=1
cat "$OUT"/table-*.md
exit $status
