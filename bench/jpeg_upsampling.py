"""How far DALI's GPU crops may lie from the CPU back-ends' crops, emulated on the CPU: the bound of
tests/gpu/test_dali.py.

The two pipelines differ in two places (lowrank_dist/data/dali.py):
- the decoder: nvJPEG on the GPU, libjpeg-turbo on the CPU (DALI's CPU decoder and PIL, bit-identical).
  The JPEG standard leaves chroma upsampling free: libjpeg-turbo's default "fancy" (triangular)
  filter against nvJPEG's default, which repeats each chroma sample. nvImageCodec's CPU decoder is
  libjpeg-turbo with either setting (`fancy_upsampling=0/1`), so both are decoded here;
- the resize: DALI's fn.resize (linear, antialiased; its CPU and GPU operators share the algorithm)
  on the GPU against torch's antialiased bilinear interpolate (`DaliBackend._resized`) on the CPU.
Each image is cropped at random-resized windows (the training crops' distribution) and scaled to
--size, once as the CPU back-end does (PIL's decode, torch's resize) and once as the GPU pipeline
does, decoded with nvJPEG's default upsampling and with `jpeg_fancy_upsampling=True` emulated.
What is left unemulated: nvJPEG's IDCT rounds differently from libjpeg-turbo's (±1 level at single
pixels), and nvJPEG decodes only the window (image_slice), which can change its edge pixels.

    python bench/jpeg_upsampling.py                  # the check's JPEGs (64–160 px) and two photos
    python bench/jpeg_upsampling.py --json out.json

Needs DALI and nvImageCodec (the `dali` extra); no GPU.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lowrank_dist.data.synthetic import make_synthetic  # noqa: E402


def libjpeg_turbo(fancy: bool):
    """A CPU decoder (nvImageCodec's libjpeg-turbo) with fancy upsampling on or off: bytes → H×W×3 uint8."""
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
                                 backends=[nvimgcodec.Backend(nvimgcodec.CPU_ONLY)],
                                 options=f":fancy_upsampling={int(fancy)}")
    return lambda data: np.asarray(decoder.decode(data).cpu())


def dali_resize(crops: list[np.ndarray], size: int) -> list[np.ndarray]:
    """The GPU pipeline's fn.resize, run by DALI's CPU operator."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=len(crops), num_threads=1, device_id=None)
    with pipe:
        images = fn.external_source(source=lambda: [np.ascontiguousarray(c) for c in crops], batch=True, layout="HWC")
        pipe.set_outputs(fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True))
    pipe.build()
    (out,) = pipe.run()
    return [np.asarray(out[i]) for i in range(len(crops))]


def torch_resize(crop: np.ndarray, size: int) -> np.ndarray:
    """The CPU back-end's resize (DaliBackend._resized)."""
    image = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).unsqueeze(0)
    scaled = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True,
                                             align_corners=False)
    return scaled[0].permute(1, 2, 0).numpy()


def windows(shape: tuple[int, int], count: int, generator: torch.Generator) -> list[tuple[int, int, int, int]]:
    """`count` random-resized crop windows (top, left, height, width) of an image of `shape`, the first the whole image."""
    found = [(0, 0, shape[0], shape[1])]
    crop = RandomResizedCrop(1)
    for _ in range(count - 1):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
        found.append(tuple(int(v) for v in crop.get_params(torch.empty(1, *shape), crop.scale, crop.ratio)))
    return found


def measure(files: list[Path], size: int, per_image: int) -> dict:
    """Mean |Δ| in grey levels (0..255) over every crop's pixels and channels, and the 99th percentile."""
    decoders = {"fancy": libjpeg_turbo(True), "default": libjpeg_turbo(False)}
    generator = torch.Generator().manual_seed(0)
    pil, gpu = [], {name: [] for name in decoders}
    whole = {name: [] for name in decoders}
    for path in files:
        data = path.read_bytes()
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        decoded = {name: decode(data) for name, decode in decoders.items()}
        for name in decoders:
            whole[name].append(np.abs(decoded[name].astype(np.int16) - reference).ravel())
        for top, left, height, width in windows(reference.shape[:2], per_image, generator):
            box = np.s_[top:top + height, left:left + width]
            pil.append(reference[box])
            for name in decoders:
                gpu[name].append(decoded[name][box])
    cpu = np.stack([torch_resize(crop, size) for crop in pil]).astype(np.int16)

    def stats(diff: np.ndarray) -> dict:
        return {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)), "max": int(diff.max())}

    result = {"images": len(files), "crops": len(pil), "size": size}
    for name in decoders:
        result[f"decode {name} vs PIL, whole image"] = stats(np.concatenate(whole[name]))
        emulated = np.stack(dali_resize(gpu[name], size)).astype(np.int16)
        result[f"GPU pipeline ({name} upsampling) vs CPU back-end"] = stats(np.abs(emulated - cpu))
    same_decoder = np.stack(dali_resize(pil, size)).astype(np.int16)
    result["resize only: DALI vs torch, same pixels"] = stats(np.abs(same_decoder - cpu))
    # the check's control: the same crops against other windows' crops (a wrong window)
    result["control: other windows"] = stats(np.abs(np.roll(cpu, 1, axis=0) - cpu))
    return result


def photos(folder: Path) -> list[Path]:
    """scikit-learn's two sample photos (427×640), re-encoded as ImageNet's JPEGs mostly are: 4:2:0, quality 90."""
    from sklearn.datasets import load_sample_images

    paths = []
    for i, image in enumerate(load_sample_images().images):
        paths.append(folder / f"photo{i}.jpg")
        Image.fromarray(image).save(paths[-1], quality=90, subsampling="4:2:0")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="crop side (tests/gpu/test_dali.py compares 64×64)")
    parser.add_argument("--images", type=int, default=200, help="generated JPEGs, as the check makes them")
    parser.add_argument("--crops", type=int, default=8, help="windows per image (the first is the whole image)")
    parser.add_argument("--json", type=Path, help="write the numbers here too")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="jpeg-upsampling-"))
    classes = 10
    make_synthetic(work / "jpegs", classes, args.images // classes, 1, seed=0, min_side=64, max_side=160)
    sets = {"the check's JPEGs (make_synthetic, 64-160 px)": sorted((work / "jpegs").rglob("*.JPEG"))}
    try:
        sets["photos (scikit-learn's samples, 4:2:0)"] = photos(work)
    except ImportError:
        print("scikit-learn is not installed: photos left out", file=sys.stderr)
    results = {name: measure(files, args.size, args.crops if "check" in name else 64) for name, files in sets.items()}
    print(f"mean |Δ| (p99, max) in grey levels, crops scaled to {args.size}×{args.size}")
    for name, result in results.items():
        print(f"\n{name}: {result['images']} images, {result['crops']} crops")
        for key, value in result.items():
            if isinstance(value, dict):
                print(f"  {key:<48} {value['mean']:6.3f}  (p99 {value['p99']:g}, max {value['max']})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
