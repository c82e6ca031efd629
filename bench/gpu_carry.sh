#!/usr/bin/env bash
# What bench/gpu.py's device plan carries to the GPU machine, which has no pydantic, no DALI and no
# network (python bench/gpu.py --plan prints the calls that carry these):
#
#   .gpu_wheels/phase1/*.whl          pydantic and what it needs, ~3 MB: phase 1 installs them there
#                                     with pip --target /tmp/site (phase 2 again, for a fresh machine)
#   .gpu_wheels/dali/part-NN          DALI, nvImageCodec, nvJPEG and what `import nvidia.dali` imports,
#                                     pre-installed for the machine's Python 3.12 (pip --target here),
#                                     packed as one tar.xz and cut in parts of at most 60 MB: a call
#                                     carries at most 64 MiB with the working tree, so one part a call
#   .gpu_wheels/dali/archive.sha256   the archive's checksum, checked there once the parts are joined
#
#   bash bench/gpu_carry.sh           # PYTHON=... picks the interpreter whose versions are pinned
#
# The versions are those installed in PYTHON's environment (default python3), the ones the project's
# tests ran with; a package not installed there is fetched at its newest version. .gpu_wheels/ is
# git-ignored.
#
# Left out on purpose: nvidia-libnvcomp-cu13 (28 MB; DALI dlopens it only for its inflate operator),
# nvJPEG2000 and nvTIFF (other formats), DALI's nvtx, makefun and libcst (imported only by
# nvidia.dali.experimental.dynamic), and the other Python versions' extension modules (DALI and
# nvImageCodec ship one per version; only cp312's loads there). Already on the GPU machine: numpy,
# packaging, six, wheel, PyYAML, TensorBoard, tqdm, pytest, torch, torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT=.gpu_wheels
PART_BYTES=60000000  # 57.2 MiB: a part, the working tree (about 2 MB) and the checksum fit in 64 MiB

PHASE1=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)
DALI=(nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg astunparse gast optree)
# the GPU machine's interpreter and platform, not this one's (the device notes' flags)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)

pinned() {  # each package at the version installed in PY's environment, if it is installed
  for package in "$@"; do
    version=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$package")
    echo "$package${version:+==$version}"
  done
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT/phase1" "$OUT/dali"

mapfile -t phase1 < <(pinned "${PHASE1[@]}")
mapfile -t dali < <(pinned "${DALI[@]}")
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$OUT/phase1" "${phase1[@]}"
"$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$work/wheels" "${dali[@]}"

# installed here for there: the machine only unpacks (no pip run, no .pyc written: --no-compile)
"$PY" -m pip install -q --no-deps --no-index --no-compile "${PLATFORM[@]}" --target "$work/site" "$work"/wheels/*.whl
find "$work/site" -name '*.cpython-3*.so' ! -name '*.cpython-312-*' -delete
(cd "$work/site" && tar -cf - -- *) | xz -6 -T0 > "$work/archive.tar.xz"
(cd "$work" && sha256sum archive.tar.xz) > "$OUT/dali/archive.sha256"
split -b "$PART_BYTES" -d -a 2 "$work/archive.tar.xz" "$OUT/dali/part-"

echo "phase 1: ${phase1[*]}"
echo "dali:    ${dali[*]}"
du -sb "$work/site" | awk '{printf "dali installed: %.1f MB\n", $1 / 1e6}'
ls -l "$OUT/phase1" "$OUT/dali"
du -cb "$OUT"/phase1/*.whl | tail -1 | awk '{printf "phase 1 wheels: %.1f MB\n", $1 / 1e6}'
du -cb "$OUT"/dali/part-* | tail -1 | awk '{printf "dali archive: %.1f MB\n", $1 / 1e6}'
