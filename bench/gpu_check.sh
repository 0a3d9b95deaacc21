#!/usr/bin/env bash
# The prepared GPU check (issue #20): install what is missing, then run bench/gpu_check.py, which writes
# one JSON of figures (training tokens/s and MFU vs HF Trainer and TRL, generation, a 1B merge,
# FSDP2/DeepSpeed one-GPU smoke runs) in at most 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh [OUT.json]         # on a GPU machine with a CUDA torch already installed
#   bash bench/gpu_check.sh --dry [OUT.json]   # CPU, tiny sizes, no installs, under a minute (CI)
#
# OUT.json defaults to $OUT/gpu_check.json (else ./gpu_check.json). Environment:
#   PYTHON                  the interpreter (default: python3); its torch is never replaced
#   GPU_CHECK_DRY=1         the same as --dry
#   GPU_CHECK_WHEELS=DIR    install from a wheel folder only (a machine without the package registry)
#   GPU_CHECK_SKIP_INSTALL=1
#   GPU_CHECK_PEAK_FLOPS    peak FLOP/s for MFU when the GPU is not in gpu_check.py's table
#   GPU_CHECK_ATTN          attention kernel for every trainer (default sdpa)
set -euo pipefail
export GPU_CHECK_T0="${GPU_CHECK_T0:-$(date +%s)}"
cd "$(dirname "$0")/.."

dry="${GPU_CHECK_DRY:-0}"
out=""
for arg in "$@"; do
  case "$arg" in
    --dry) dry=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (expected --dry or an output path)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
PY="${PYTHON:-python3}"
out="${out:-${OUT:+$OUT/}gpu_check.json}"

if ! torch_info="$("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())' 2>/dev/null)"; then
  echo "gpu_check.sh: $PY cannot import torch; install a CUDA build of torch first (this never installs torch)" >&2
  exit 2
fi
read -r torch_version cuda <<<"$torch_info"
echo "gpu_check.sh: $PY, torch $torch_version, CUDA available: $cuda" >&2
if [[ "$dry" == 1 ]]; then
  exec "$PY" bench/gpu_check.py --dry --out "$out"
fi
if [[ "$cuda" != True ]]; then
  echo "gpu_check.sh: no CUDA device (torch.cuda.is_available() is False); run with --dry for the CPU check" >&2
  exit 2
fi

# Install mixtune and what the check needs, pinned by constraints/ci.txt, keeping the installed torch:
# the constraints' torch (and its CUDA libraries) are replaced by the version already here.
if [[ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]] && \
   ! "$PY" -c 'import mixtune, trl, deepspeed, datasets, yaml, liger_kernel' 2>/dev/null; then
  constraints="$(mktemp)"
  grep -v -E '^(torch|triton|nvidia-)' constraints/ci.txt >"$constraints"
  echo "torch==$torch_version" >>"$constraints"
  src=()
  if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then src=(--no-index --find-links "$GPU_CHECK_WHEELS"); fi
  "$PY" -m pip install -q "${src[@]}" -c "$constraints" -e ".[bench]" \
    || echo "gpu_check.sh: installing mixtune/trl failed; the parts that need them will record the error" >&2
  # DeepSpeed builds against the installed torch: no isolated build environment (it would fetch another torch)
  deepspeed="$(grep -E '^deepspeed==' constraints/ci.txt || echo deepspeed)"
  "$PY" -m pip install -q "${src[@]}" -c "$constraints" --no-build-isolation "$deepspeed" \
    || echo "gpu_check.sh: installing deepspeed failed; the ZeRO smoke runs will record it" >&2
  rm -f "$constraints"
  "$PY" -c 'import torch, sys; sys.exit(torch.__version__ != sys.argv[1])' "$torch_version" \
    || { echo "gpu_check.sh: torch changed during the install (now not $torch_version): stop" >&2; exit 2; }
fi

# gpu_check.py keeps each part to its budget and the whole to 480 s from GPU_CHECK_T0; this is the backstop
timeout 540 "$PY" bench/gpu_check.py --out "$out"
