#!/usr/bin/env bash
# The whole GPU measurement of benchmarks/RESULTS.md in one go, in under 8 minutes on one GPU:
#   FPS at 800x1333 for focus / dense / sparse in fp32 and AMP (autocast), training-step time and peak memory
#   per mode, torch.compile attempted on the focus model (what breaks is reported, not fatal), then the stage
#   breakdown with efficiency against the GPU's matmul peak (focus-detr benchmark --device cuda).
# Writes OUT/gpu.md (Markdown tables to paste into RESULTS.md), OUT/gpu.json and OUT/stages.{json,txt}.
#
#   bash benchmarks/gpu.sh                  # OUT = runs/gpu
#   bash benchmarks/gpu.sh --out DIR
#   bash benchmarks/gpu.sh --dry-run        # on a CPU: tiny preset, seconds; checks the script, measures nothing
#
# Without a GPU (and without --dry-run) it stops at once with a one-line message and exit code 2.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
OUT="runs/gpu"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --out) OUT="${2:?--out needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (use --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
done

if [ "$DRY" = 0 ]; then
  if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu.sh: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); run it on a GPU machine, or with --dry-run to check the script on the CPU" >&2
    exit 2
  fi
fi

mkdir -p "$OUT"
START=$(date +%s)
if [ "$DRY" = 1 ]; then
  "$PYTHON" "$HERE/bench_gpu.py" --dry-run --out "$OUT"
  "$PYTHON" -m focus_detr.cli.main benchmark --preset tiny --size 96x128 --repeats 1 --warmup 0 --modes focus,dense \
      --no-memory --no-anchor --quiet --output "$OUT/stages.json" > "$OUT/stages.txt"
else
  # budget: the Python driver stops starting new parts at 420 s; the stage breakdown takes about a minute
  "$PYTHON" "$HERE/bench_gpu.py" --out "$OUT" --budget-s 360
  timeout 150 "$PYTHON" -m focus_detr.cli.main benchmark --device cuda --size 800x1333 --repeats 10 --warmup 2 \
      --no-memory --no-anchor --quiet --output "$OUT/stages.json" > "$OUT/stages.txt" \
    || echo "gpu.sh: the stage breakdown (focus-detr benchmark --device cuda) failed or ran out of time; gpu.md stands" >&2
fi
{
  echo
  echo "## Stages (focus-detr benchmark$([ "$DRY" = 1 ] && echo ', dry run'))"
  echo
  echo '```'
  cat "$OUT/stages.txt" 2>/dev/null || true
  echo '```'
} >> "$OUT/gpu.md"
echo "gpu.sh: done in $(( $(date +%s) - START )) s; tables in $OUT/gpu.md" >&2
