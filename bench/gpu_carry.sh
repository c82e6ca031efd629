#!/usr/bin/env bash
# The Python packages bench/gpu.py needs on the GPU machine that it lacks (DALI and what DALI and the
# trainer import: pydantic), as wheels for its Python 3.12 / x86-64, in parts small enough to travel
# one per device call (each call carries the working tree and its carried paths, 64 MiB in all).
#
#   bash bench/gpu_carry.sh            # → .gpu_wheels/part-00 … part-NN (< 60 MB each) and bundle.sha256
#
# The versions are those installed in this machine's environment (PYTHON, default python3), the ones
# the project's tests ran with; a package not installed here is fetched at its newest version. The
# sequence of device calls that carries the parts, joins and installs them and runs bench/gpu.py is in
# bench/gpu.py's docstring ("How to run on a GPU"). .gpu_wheels/ is git-ignored.
#
# Not carried, on purpose: nvidia-libnvcomp-cu13 (28 MB; DALI dlopens it only for its inflate
# operator) and DALI's nvtx, makefun and libcst (not imported by the pipeline bench/gpu.py builds).
# Already on the GPU machine: numpy, packaging, six, PyYAML, SciPy, torch, torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT=.gpu_wheels
PART_BYTES=60000000  # 57.2 MiB: a part, the working tree (about 2 MB) and the checksum fit in 64 MiB

# DALI, its decoder library (nvImageCodec) and nvJPEG (the machine's torchvision has its own copy under
# a hashed name that nvImageCodec cannot find), what `import nvidia.dali` imports (astunparse, gast,
# optree), and pydantic for the config the trainer reads (typing-extensions: pydantic needs a recent one)
PACKAGES=(nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg astunparse gast optree
          pydantic pydantic-core annotated-types typing-inspection typing-extensions)

pinned=()
for package in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$package")
  pinned+=("$package${version:+==$version}")
done

rm -rf "$OUT"
mkdir -p "$OUT/wheels"
# the GPU machine's interpreter and platform, not this one's (the same flags as the device notes give)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT/wheels" "${pinned[@]}"

# one uncompressed tar (the wheels are zip files already), its checksum, then the parts
tar -cf "$OUT/bundle.tar" -C "$OUT" wheels
(cd "$OUT" && sha256sum bundle.tar > bundle.sha256)
split -b "$PART_BYTES" -d -a 2 "$OUT/bundle.tar" "$OUT/part-"
rm -rf "$OUT/bundle.tar" "$OUT/wheels"

echo "wheels: ${pinned[*]}"
ls -l "$OUT"
du -cb "$OUT"/part-* | tail -1 | awk '{printf "%.1f MB in all\n", $1 / 1e6}'
