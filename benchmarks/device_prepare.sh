#!/usr/bin/env bash
# Prepare, on a machine that reaches the package registry, what benchmarks/device_check.sh
# needs on the GPU machine, which has no network and receives only the checkout (with the
# git-ignored folders named to travel along):
#
#   .device/wheels      cp312 manylinux x86_64 wheels of the run-time packages the GPU
#                       machine lacks (benchmarks/device_packages.txt, "carry"), at
#                       requirements.txt's versions; their own requirements must all be
#                       carried or present there (checked here)
#   .device/wheels311   the same versions for CPython 3.11 (the CPU rehearsal, --rehearse)
#   .device/fixtures    the official-model parity fixtures (../shared is not carried)
#   .device/source.json the commit they were prepared at
#
#   benchmarks/device_prepare.sh        # then carry the folder .device (about 16 MB)
#
# Environment: PYTHON (default .venv/bin/python if present, else python3; needs pip),
# DARE_SHARED_DIR (default ../shared; its fixtures/reference_parity/*.npz are copied).
set -euo pipefail

cd "$(dirname "$0")/.."
case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
  *) echo "unknown argument: $1 (expected none)" >&2; exit 2 ;;
esac
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SHARED="${DARE_SHARED_DIR:-../shared}"

# "name==version" of each carried package, from requirements.txt's pins.
mapfile -t CARRIED < <(awk '$1 == "carry" {print $2}' benchmarks/device_packages.txt)
SPECS=()
for name in "${CARRIED[@]}"; do
  pin=$(grep -i -E "^${name}==" requirements.txt || true)
  if [[ -z "$pin" ]]; then
    echo "requirements.txt pins no version of $name (benchmarks/device_packages.txt)" >&2
    exit 1
  fi
  SPECS+=("$pin")
done

download() {  # download PYTHON_VERSION FOLDER: the carried wheels for that CPython
  rm -rf "$2"
  mkdir -p "$2"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$1" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$2" "${SPECS[@]}"
}
echo "downloading ${SPECS[*]}"
download 3.12 .device/wheels
download 3.11 .device/wheels311

# Every requirement of a carried wheel must be carried too or be on the device (a run-time
# line of requirements.txt that device_packages.txt does not call absent).
"$PYTHON" - .device/wheels <<'EOF'
import re, sys, zipfile
from pathlib import Path

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

listed = Path("benchmarks/device_packages.txt").read_text().split("\n")
carried = {norm(l.split()[1]) for l in listed if l.startswith("carry ")}
absent = {norm(l.split()[1]) for l in listed if l.startswith("absent ")}
runtime = Path("requirements.txt").read_text().split("# test-only")[0]
on_device = {norm(l.split("==")[0]) for l in runtime.split("\n") if "==" in l} - absent
missing = []
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                need = norm(re.match(r"[A-Za-z0-9_.-]+", line.split(":", 1)[1].strip())[0])
                if need not in carried | on_device:
                    missing.append(f"{wheel.name} needs {need}")
if missing:
    sys.exit("not carried and not on the device:\n  " + "\n  ".join(missing))
print(f"requirements of the carried wheels: all carried or on the device")
EOF

fixtures=("$SHARED"/fixtures/reference_parity/*.npz)
if [[ ! -e "${fixtures[0]}" ]]; then
  echo "no parity fixtures under $SHARED/fixtures/reference_parity (set DARE_SHARED_DIR)" >&2
  exit 1
fi
rm -rf .device/fixtures
mkdir -p .device/fixtures
cp "${fixtures[@]}" .device/fixtures/
"$PYTHON" - <<EOF
import json, subprocess
def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
json.dump({"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
           "carried": "${SPECS[*]}".split()}, open(".device/source.json", "w"), indent=1)
EOF

echo
ls -l .device/wheels .device/wheels311 .device/fixtures | sed 's/^/  /'
echo "carry (git-ignored, must travel with the checkout): .device ($(du -sh .device | cut -f1))"
echo "then, on the GPU machine: benchmarks/device_check.sh"
echo "rehearse here first: benchmarks/device_check.sh --rehearse"
