#!/usr/bin/env bash
# One command for a GPU machine (`make gpu-check`): the tests marked `cuda` and the onboarding benchmark at
# SD 1.5 shapes, unattended, in under 8 minutes on one H200; JSON and a log under build/gpu_check/.
#
#   bash benchmarks/gpu_check.sh                   # CUDA machine: pytest -m cuda tests/gpu + the benchmark
#   bash benchmarks/gpu_check.sh --smoke           # anywhere (what CI runs): the benchmark's tiny CPU mode
#   bash benchmarks/gpu_check.sh --download-wheels # here, with network: fetch the cp312 wheels the GPU machine lacks
#
# Without a GPU it runs the smoke mode. The GPU machine has Python 3.12 + torch but lacks some of the project's
# dependencies (../shared/ENVIRONMENT.md, "The GPU machine") and has no network: `--download-wheels` puts them,
# at the versions installed here from pyproject.toml's pins, as wheels in build/gpu-wheels/; there this script
# installs them (`pip install --no-index --no-deps --target`) into build/gpu-site/ and puts that on PYTHONPATH.
# Environment: BUILD_DIR (default: build), PYTHON (default: .venv/bin/python where it exists, else python3),
# GPU_CHECK_MINUTES (the benchmark's budget, default 3.5).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${BUILD_DIR:-$ROOT/build}"
OUT="$BUILD/gpu_check"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

# What the GPU machine lacks (ENVIRONMENT.md), with the dependencies they pull in. Versions: those installed
# in this venv, i.e. pyproject.toml's pins and what pip resolved beside them, known to import together.
# safetensors: pinned in pyproject.toml, and diffusers 0.42 needs >= 0.8.
WHEELS=(diffusers open_clip_torch transformers safetensors pydantic pydantic_core annotated_types typing_inspection
        boto3 botocore s3transfer jmespath ftfy wcwidth importlib_metadata zipp lazy_importer)

mode=full
for arg in "$@"; do
  case "$arg" in
    --smoke) mode=smoke ;;
    --download-wheels) mode=download ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --smoke, --download-wheels or none)" >&2; exit 2 ;;
  esac
done

if [[ "$mode" == download ]]; then
  mkdir -p "$BUILD/gpu-wheels"
  specs=$("$PYTHON" - "${WHEELS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
out = []
for name in sys.argv[1:]:
    try:
        out.append(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"{name} is not installed here: run make setup first")
print(" ".join(out))
EOF
)
  echo "downloading cp312 wheels: $specs"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d "$BUILD/gpu-wheels" $specs
  du -sh "$BUILD/gpu-wheels"
  exit 0
fi

mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

shopt -s nullglob
wheels=("$BUILD"/gpu-wheels/*.whl)
if (( ${#wheels[@]} )); then
  # Installed beside the machine's own packages (--target, no resolver, no index): its torch stays.
  "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target "$BUILD/gpu-site" "${wheels[@]}" 2>&1 | tee -a "$LOG"
  export PYTHONPATH="$BUILD/gpu-site:$PYTHONPATH"
fi

if [[ "$mode" == full ]] && ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device: running the smoke mode" | tee -a "$LOG"
  mode=smoke
fi

cd "$ROOT"
if [[ "$mode" == smoke ]]; then
  "$PYTHON" benchmarks/gpu_onboard.py --tiny --concepts 2 --modes plain budget --budget-gib 0.05 \
    --max-minutes 5 --out "$OUT/gpu_onboard.json" 2>&1 | tee -a "$LOG"
  exit "${PIPESTATUS[0]}"
fi

status=0
start=$SECONDS
nvidia-smi 2>&1 | tee -a "$LOG" || true
# --noconftest: tests/gpu needs no fixture, and the shared conftest imports what this machine may lack.
"$PYTHON" -m pytest -m cuda tests/gpu -q -p no:cacheprovider --noconftest -o addopts="" 2>&1 | tee -a "$LOG" \
  || status=1
# Budget: 8 minutes on one H200 in all. The main run stops starting new runs after GPU_CHECK_MINUTES; each
# speed lever (alone, at C=32, no anchor or encoding) then runs while the 450 s total lasts.
minutes="${GPU_CHECK_MINUTES:-3.5}"
"$PYTHON" benchmarks/gpu_onboard.py --concepts 8 16 32 --modes plain budget --budget-gib 40 \
  --max-minutes "$minutes" --out "$OUT/gpu_onboard.json" 2>&1 | tee -a "$LOG" || status=1
for lever in "--channels-last" "--attention cudnn" "--attention efficient" "--compile"; do
  left=$(( 450 - (SECONDS - start) ))
  if (( left < 45 )); then
    echo "time budget reached: lever $lever not measured" | tee -a "$LOG"
    continue
  fi
  name=$(echo "$lever" | tr -d '-' | tr ' ' '_')
  # shellcheck disable=SC2086
  timeout "$(( left < 120 ? left : 120 ))" "$PYTHON" benchmarks/gpu_onboard.py --concepts 32 --modes plain \
    --no-anchor --no-encode --measure-steps 5 --max-minutes 1 $lever --out "$OUT/lever_$name.json" 2>&1 \
    | tee -a "$LOG" || status=1
done
echo "gpu_check: status $status after $((SECONDS - start)) s; JSON and log in $OUT" | tee -a "$LOG"
exit $status
