#!/usr/bin/env bash
# GPU check, about 5 minutes on one NVIDIA GPU: install the CUDA jaxlib, run the parity
# check against the official PyTorch outputs, measure training samples/s of DIN, TWIN and
# DARE at Taobao scale (item_n 4,068,791, cate_n 9,408, L 200, batch 2048, dims 16).
#
#   benchmarks/gpu_check.sh               # on the GPU machine, from the repository root
#   benchmarks/gpu_check.sh --skip-install  # jax[cuda13] already installed
#   benchmarks/gpu_check.sh --dry-run     # CPU only: no install, no GPU, tiny throughput run
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), DARE_SHARED_DIR
# (default ../shared; its fixtures/reference_parity/*.npz are the parity fixtures; skipped
# when absent), GPU_CHECK_LOG (default benchmarks/gpu_check_<UTC time>.log; everything
# printed is also written there).
#
# Parity runs twice: with float32 matmuls at full precision (JAX_DEFAULT_MATMUL_PRECISION=
# highest; must pass at the default tolerance) and at the GPU's default precision, which
# may use TF32 tensor cores (reported, not required to pass). The throughput figures are
# medians over 5 timed steps after 2 warm-up steps, compilation excluded
# (benchmarks/step_throughput.py: the driver's training step, forward + backward + dense Adam of
# every parameter, with optax.adam ("optax") and with dare_jax.optim.RowSparseAdam
# ("row_sparse", the default), and the evaluation pass "forward").
set -uo pipefail

cd "$(dirname "$0")/.."
DRY_RUN=0
SKIP_INSTALL=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (expected --dry-run, --skip-install)" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SHARED="${DARE_SHARED_DIR:-../shared}"
LOG="${GPU_CHECK_LOG:-benchmarks/gpu_check_$(date -u +%Y%m%dT%H%M%SZ).log}"
mkdir -p "$(dirname "$LOG")"
exec > >(tee -a "$LOG") 2>&1
STATUS=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1 /proc/loadavg))"; }

step "machine"
echo "python: $("$PYTHON" --version 2>&1), repo commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if [[ $DRY_RUN == 1 ]]; then
  export JAX_PLATFORMS=cpu
  echo "dry run: CPU only"
else
  if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; then
    echo "nvidia-smi failed: no NVIDIA GPU visible" >&2
    exit 1
  fi
fi

step "install"
if [[ $DRY_RUN == 1 || $SKIP_INSTALL == 1 ]]; then
  echo "skipped"
elif "$PYTHON" -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" 2>/dev/null; then
  echo "jax already sees a GPU: skipped"
else
  # requirements.txt pins the CPU jax; the CUDA wheel of the same version replaces its plugin.
  timeout 240 "$PYTHON" -m pip install -q -r requirements.txt "jax[cuda13]==0.10.2" || {
    echo "pip install failed" >&2
    exit 1
  }
fi
"$PYTHON" -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())" || exit 1
if [[ $DRY_RUN == 0 ]]; then
  "$PYTHON" -c "import jax, sys; sys.exit(jax.devices()[0].platform != 'gpu')" || {
    echo "jax does not see the GPU after the install" >&2
    exit 1
  }
fi

step "parity with the official PyTorch outputs"
FIXTURES=("$SHARED"/fixtures/reference_parity/*.npz)
if [[ -e "${FIXTURES[0]}" ]]; then
  echo "-- float32 matmuls at full precision (must pass)"
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout 150 "$PYTHON" -m dare_jax.interop.check_parity \
    "${FIXTURES[@]}" || { echo "PARITY FAILED"; STATUS=1; }
  if [[ $DRY_RUN == 0 ]]; then
    echo "-- the GPU's default matmul precision (may use TF32; for information)"
    timeout 150 "$PYTHON" -m dare_jax.interop.check_parity "${FIXTURES[@]}" \
      || echo "(default precision exceeds the float32 tolerance: TF32 rounding)"
  fi
else
  echo "no fixtures under $SHARED/fixtures/reference_parity: skipped"
fi

step "training throughput"
if [[ $DRY_RUN == 1 ]]; then
  SCALE=(--item-n 20000 --cate-n 500 --batch 128 --length 20 --steps 1 --warmup 1)
else
  SCALE=(--steps 5 --warmup 2)  # Taobao scale: the script's defaults
fi
timeout 300 "$PYTHON" benchmarks/step_throughput.py --models din twin dare \
  --variants optax,row_sparse,forward "${SCALE[@]}" || { echo "THROUGHPUT FAILED"; STATUS=1; }

step "done (status $STATUS); log: $LOG"
exit $STATUS
