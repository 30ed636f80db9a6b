#!/usr/bin/env bash
# The GPU check, one command on one NVIDIA GPU with no network, within BUDGET_SECONDS: uses
# the machine's python3 and its CUDA JAX as they are (never pip-installs JAX, never reaches a
# registry), installs the wheels benchmarks/device_prepare.sh put in .device/wheels offline,
# then (benchmarks/device_check.py) checks parity with the official PyTorch outputs at full
# float32 precision (must pass) and at the default precision (reported), and measures DIN,
# TWIN and DARE at Taobao scale (item_n 4,068,791, cate_n 9,408, L 200, batch 2048, dims
# 16): the driver's training step, the whole training loop (dare_jax.main on a synthetic log
# with Taobao-sized tables, histories built on the host and on the device), compile time,
# peak GPU memory, and the input pipeline's host costs.
#
#   benchmarks/device_prepare.sh      # beforehand, where the registry is reached
#   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 benchmarks/device_check.sh
#       # on the GPU machine (.device carried along)
#   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 benchmarks/device_check.sh --rehearse
#       # here: the same run on the CPU, tiny scale, in a copy of the checkout with
#       # ../shared out of reach, in a fresh virtual environment holding only the packages
#       # the GPU machine has (from the registry), the rest installed from .device/wheels311
#       # alone, without network where `unshare -n` works
#   GLIBC_TUNABLES=glibc.malloc.hugetlb=1 benchmarks/device_check.sh --tiny
#       # what --rehearse runs inside its copy
#
# GLIBC_TUNABLES=glibc.malloc.hugetlb=1 is the allocator setting the figures are measured
# with (host buffers in 2 MiB pages; dare_jax.huge_pages): every stage inherits it (--rehearse
# passes it on) and the environment stage records it.
# Writes device_check.log and device_check.json (every figure, each stage's status) to $OUT
# (default runs/device_check). Environment: PYTHON (default python3: the machine's), OUT,
# BUDGET_SECONDS (default 470: the stages' total), STAGES (default all: a comma-separated
# subset, benchmarks/device_check.py lists them), REHEARSAL_PYTHON (default python3, a
# CPython 3.11 for --rehearse). Exit status 0 only if parity at full precision passes and
# every stage that ran succeeded.
set -uo pipefail

cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  "") ;;
  --tiny) MODE=tiny ;;
  --rehearse) MODE=rehearse ;;
  -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (expected --rehearse or --tiny)" >&2; exit 2 ;;
esac
OUT="${OUT:-runs/device_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

if [[ $MODE == rehearse ]]; then
  exec > >(tee "$OUT/rehearsal.log") 2>&1
  for path in .device/wheels311 .device/fixtures; do
    if [[ -z "$(ls "$path" 2>/dev/null)" ]]; then
      echo "$path is missing: run benchmarks/device_prepare.sh first" >&2
      exit 1
    fi
  done
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  # The packages the GPU machine has that the check uses (requirements.txt's run-time lines
  # without the carried, absent and unused ones), from the registry as CI installs them.
  PY311="${REHEARSAL_PYTHON:-python3}"
  "$PY311" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
    echo "--rehearse needs CPython 3.11 (the cp311 wheels): set REHEARSAL_PYTHON" >&2
    exit 1
  }
  sed '/^# test-only/,$d' requirements.txt | grep -v -i -w -E "^($(awk \
    '$1 ~ /^(carry|absent|unused)$/ {printf "%s%s", sep, $2; sep = "|"}' \
    benchmarks/device_packages.txt))" | grep -v '^#' > "$WORK/preinstalled.txt"
  echo "== rehearsal: a fresh virtual environment with $(grep -c == "$WORK/preinstalled.txt")" \
    "packages ($(date -u +%H:%M:%S) UTC)"
  if ! "$PY311" -m venv "$WORK/venv" \
    || ! "$WORK/venv/bin/pip" install -q --no-deps -r "$WORK/preinstalled.txt"; then
    echo "installing the rehearsal environment failed" >&2
    exit 1
  fi
  # What travels to the GPU machine: tracked and untracked-not-ignored files, and .device
  # (its cp311 wheels standing in for the cp312 ones); ../shared stays behind.
  mkdir -p "$WORK/checkout/.device"
  git ls-files -z --cached --others --exclude-standard \
    | (while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done) \
    | xargs -0 cp --parents -t "$WORK/checkout"
  cp -r .device/wheels311 "$WORK/checkout/.device/wheels"
  cp -r .device/fixtures "$WORK/checkout/.device/fixtures"
  ISOLATE=()
  if unshare -n true 2>/dev/null; then
    ISOLATE=(unshare -n)
    echo "no network for the run (unshare -n)"
  else
    echo "unshare -n is not permitted here: the run keeps the network (pip runs --no-index)"
  fi
  mkdir -p "$WORK/home"
  (cd "$WORK/checkout" && "${ISOLATE[@]}" env -i PATH="$WORK/venv/bin:/usr/bin:/bin" \
    HOME="$WORK/home" OUT="$OUT" PYTHON="$WORK/venv/bin/python" JAX_PLATFORMS=cpu \
    DARE_SHARED_DIR="$WORK/no-shared" BUDGET_SECONDS="${BUDGET_SECONDS:-900}" \
    ${GLIBC_TUNABLES+GLIBC_TUNABLES="$GLIBC_TUNABLES"} \
    bash benchmarks/device_check.sh --tiny)
  STATUS=$?
  echo "== rehearsal done (status $STATUS); log and summary: $OUT/device_check.{log,json}"
  exit $STATUS
fi

exec > >(tee "$OUT/device_check.log") 2>&1
PYTHON="${PYTHON:-python3}"
echo "== device check ($MODE) on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
  "python: $(command -v "$PYTHON") ($("$PYTHON" --version 2>&1))"
for path in .device/wheels .device/fixtures; do
  if [[ -z "$(ls "$path" 2>/dev/null)" ]]; then
    echo "$path is missing: run benchmarks/device_prepare.sh where the registry is reached" \
      "and carry the folder .device with the checkout" >&2
    exit 1
  fi
done
# The carried wheels, offline, into a folder of their own (pip's configuration and the
# environment's index settings ignored: --isolated); jax and the rest stay the machine's.
SITE="$(mktemp -d)/site"
if ! "$PYTHON" -m pip install --isolated -q --no-index --no-deps --no-compile --no-cache-dir \
  --target "$SITE" .device/wheels/*.whl; then
  echo "offline install of .device/wheels failed" >&2
  exit 1
fi
export PYTHONPATH="$SITE:$PWD"
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/device_check.py --mode "$MODE" --out "$OUT" --site "$SITE" \
  --budget "${BUDGET_SECONDS:-470}" ${STAGES:+--stages "$STAGES"}
