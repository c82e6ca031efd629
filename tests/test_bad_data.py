"""Bad data, both back-ends: what decodes (grayscale, CMYK, a PNG named .JPEG), what is bad (truncated,
zero-byte, text, corrupt), `on_bad_image: error` naming the file, `skip` keeping every label right
and the val count exact, and the `python -m lowrank_dist.data.check` pre-flight.

The folders come from helpers.write_jpeg_folder, whose solid colours encode (sample index, class),
so every check reads from the decoded pixels which file filled each slot. The planted grayscale
images sit at indices whose code colour is grey, (30, 30, 30) for index 0 of class 0, so they still
carry their code; CMYK keeps it within JPEG round-off and PNG exactly.
"""

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowrank_dist.data import DataError
from lowrank_dist.data import dali as dali_module
from lowrank_dist.data.augment import IMAGENET_MEAN, IMAGENET_STD
from lowrank_dist.data.check import check_images, main as check_main

from .helpers import code_colour, loaders_from, read_codes, write_jpeg_folder

BACKENDS = ["torchvision"] + (["dali"] if dali_module.dali_available() else [])
BAD = {"truncated": "truncated", "truncated-end": "truncated", "zero-byte": "zero-byte",
       "text": "not an image", "corrupt": "cannot be decoded"}  # kind → what the message says
TRAIN = {"train": [6, 6, 5], "val": [7, 7, 6]}  # classes: train 0–5, 6–11, 12–16; val 0–6, 7–13, 14–19
PLANTS = {  # sample index → kind; the last index of each split is bad, so its replacement wraps to 0
    "train": {0: "grayscale", 2: "truncated", 5: "cmyk", 7: "zero-byte", 8: "text", 11: "png", 13: "corrupt",
              16: "truncated-end"},
    "val": {0: "grayscale", 3: "cmyk", 4: "truncated", 9: "zero-byte", 10: "text", 11: "png", 15: "corrupt",
            19: "truncated-end"},
}


def noisy_jpeg(seed: int = 0, side: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=95)
    return out.getvalue()


def plant(path: Path, kind: str, colour: tuple[int, int, int]) -> None:
    """Overwrite `path` with a file of `kind`; the decodable kinds keep the code colour."""
    image = Image.new("RGB", (40, 32), colour)
    if kind == "grayscale":
        assert colour[0] == colour[1] == colour[2]
        Image.new("L", (40, 32), colour[0]).save(path, format="JPEG", quality=95)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, format="JPEG", quality=95)
    elif kind == "png":
        image.save(path, format="PNG")
    elif kind == "truncated":  # cut inside the image data: DALI alone would show it, half grey
        data = noisy_jpeg()
        path.write_bytes(data[:len(data) * 2 // 3])
    elif kind == "truncated-end":  # the end lost: DALI decodes a crop that stops short of it (the val
        out = io.BytesIO()           # centre crop here), code colour and all, without a word; PIL refuses
        Image.new("RGB", (200, 150), colour).save(out, format="JPEG", quality=95)
        path.write_bytes(out.getvalue()[:-2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("<html>404 Not Found</html>\n")
    elif kind == "corrupt":  # a valid header and end marker, a bogus Huffman table: only a decoder can tell
        data = bytearray(noisy_jpeg())
        table = data.find(b"\xff\xc4")
        data[table + 5:table + 21] = b"\xff" * 16  # code counts summing past 256
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(kind)


def split_paths(root: Path, split: str) -> list[Path]:
    return sorted((root / split).rglob("*.JPEG"))  # the loaders' order: class folder, then file


def planted_folder(root: Path, counts=TRAIN, plants=PLANTS) -> Path:
    write_jpeg_folder(root, counts)
    for split, kinds in plants.items():
        paths = split_paths(root, split)
        labels = [label for label, count in enumerate(counts[split]) for _ in range(count)]
        for index, kind in kinds.items():
            plant(paths[index], kind, code_colour(index, labels[index]))
    return root


def bad_indices(split: str) -> set[int]:
    return {index for index, kind in PLANTS[split].items() if kind in BAD}


def filled_by(slot: int, count: int, bad: set[int]) -> int:
    """The documented replacement: the first good sample at or after the slot, wrapping around."""
    return next((slot + step) % count for step in range(count) if (slot + step) % count not in bad)


def loaders(root, backend, **options):
    options = {"batch_size": 4, "image_size": 16, "workers": 0 if backend == "torchvision" else 1, **options}
    return loaders_from(root, backend=backend, dali_device="cpu", **options)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_folder(tmp_path_factory.mktemp("planted"))


# -- skip: every label right, counted, nothing shifted ------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_fills_each_bad_slot_with_the_next_good_image_and_its_own_label(planted, backend):
    data = loaders(planted, backend, on_bad_image="skip", workers=2 if backend == "torchvision" else 1)
    train, bad, paths = data.train, bad_indices("train"), split_paths(planted, "train")
    for epoch in (0, 1):
        batches = list(train.epoch(epoch))
        assert [len(labels) for _, labels in batches] == [4, 4, 4, 4, 1]  # shapes unchanged
        images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        decoded, classes = read_codes(images)
        assert labels.tolist() == classes  # the label of the image really decoded, every slot
        assert decoded == [filled_by(slot, 17, bad) for slot in train.indices(epoch).tolist()]
        assert train.replaced.count == 5 * (epoch + 1)
    assert sorted(train.replaced.paths) == sorted(str(paths[i]) for i in bad)
    for index in bad:
        assert BAD[PLANTS["train"][index]] in train.replaced.reasons[str(paths[index])]
    # a resumed epoch is the same as the rest of the uninterrupted one, replacements included
    tail = list(train.epoch(1, start_batch=2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, batches[2:], strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2])
def test_skip_counts_each_good_val_image_exactly_once(planted, backend, world_size):
    counted, skipped, lengths = [], 0, set()
    for rank in range(world_size):
        val = loaders(planted, backend, on_bad_image="skip", rank=rank, world_size=world_size).val
        batches = list(val)
        lengths.add(len(batches))
        for images, labels, valid in batches:
            decoded, classes = read_codes(images)
            assert labels.tolist() == classes
            counted += [i for i, ok in zip(decoded, valid.tolist()) if ok]
        skipped += val.replaced.count
    assert sorted(counted) == sorted(set(range(20)) - bad_indices("val"))
    assert skipped == 5 and len(lengths) == 1


# -- error: stop at once, naming the file ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(BAD))
def test_error_stops_with_a_data_error_naming_the_file(tmp_path, backend, kind):
    split = "val" if kind == "zero-byte" else "train"  # one kind through the val loader
    root = planted_folder(tmp_path / "data", {"train": [3, 3], "val": [2, 2]}, {split: {1: kind}})
    path = split_paths(root, split)[1]
    data = loaders(root, backend)  # on_bad_image "error" is the default
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + BAD[kind]):
        list(data.train.epoch(0)) if split == "train" else list(data.val)


def test_the_train_command_exits_2_with_one_line_naming_the_bad_file(tmp_path, capsys):
    from lowrank_dist.train import main

    root = planted_folder(tmp_path / "data", {"train": [8, 8], "val": [2, 2]}, {"train": {3: "text"}})
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"out_dir": str(tmp_path / "runs"), "name": "t", "device": "cpu"},
        "model": {"name": "tiny_vgg"},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 4, "image_size": 32, "workers": 0},
        "optim": {"epochs": 1},
    }))
    assert main(["--config", str(config)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and str(split_paths(root, "train")[3]) in error and "not an image" in error


# -- grayscale and CMYK: RGB, the same in both back-ends -------------------------------------------------------


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs DALI")
def test_grayscale_and_cmyk_decode_to_the_same_rgb_in_both_backends(tmp_path):
    """Textured images, so a channel mix-up or an inverted CMYK would show."""
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, 255 - x * 3], axis=-1).astype(np.uint8)
    sources = {"gray": Image.fromarray(rgb).convert("L"), "cmyk": Image.fromarray(rgb).convert("CMYK")}
    for split in ("train", "val"):
        for name, image in sources.items():
            (tmp_path / split / name).mkdir(parents=True)
            image.save(tmp_path / split / name / "0.JPEG", quality=95)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    decoded = {}
    for backend in BACKENDS:
        (images, labels, _), = list(loaders(tmp_path, backend, image_size=48, val_resize=48).val)
        assert images.shape == (2, 3, 48, 48) and labels.tolist() == [0, 1]  # classes: cmyk, gray
        decoded[backend] = (images * std + mean) * 255
    tv, dali = decoded["torchvision"], decoded["dali"]
    assert (tv - dali).abs().mean() < 1.5 and (tv - dali).abs().max() < 12  # grey levels: JPEG tolerance
    for pixels in (tv, dali):
        gray = pixels[1]
        assert (gray.max(dim=0).values - gray.min(dim=0).values).max() < 1  # R = G = B
        reference = torch.from_numpy(rgb[:, 8:56]).permute(2, 0, 1).float()  # the centre crop, source colours
        assert (pixels[0] - reference).abs().mean() < 4  # CMYK back to its own colours


# -- the pre-flight check -------------------------------------------------------------------------------------


def run_check(capsys, *args) -> tuple[int, str]:
    code = check_main([str(arg) for arg in args])
    return code, capsys.readouterr().out


def test_check_finds_every_planted_problem_and_exits_1(tmp_path, capsys):
    root = planted_folder(tmp_path / "data")
    train, val = split_paths(root, "train"), split_paths(root, "val")
    (root / "train" / "c03").mkdir()  # an empty class folder
    (root / "val" / "zebra").mkdir()  # a val class that train lacks
    shutil.copy(val[1], root / "val" / "zebra" / "0.JPEG")
    (root / "train" / "c00" / "notes.txt").write_text("ignored")
    big = noisy_jpeg(side=300)  # larger than the 64 KiB head: the fast path reads head and tail only
    assert len(big) > 100_000
    (root / "train" / "c02" / "big.JPEG").write_bytes(big + b"\0" * 10_000)  # trailing bytes after the end
    (root / "train" / "c02" / "big_cut.JPEG").write_bytes(big[:80_000])
    problems = {str(p) for i, p in enumerate(train) if i in bad_indices("train")} | {
        str(p) for i, p in enumerate(val) if i in bad_indices("val")} | {
        str(root / "train" / "c03"), str(root / "val" / "zebra"), str(root / "train" / "c02" / "big_cut.JPEG")}
    corrupt = {str(train[13]), str(val[15])}  # a valid header: only --decode finds them
    listing = tmp_path / "bad.txt"

    code, out = run_check(capsys, root, "--list", listing)
    found = {line.split()[1] for line in out.splitlines() if line.startswith("PROBLEM")}
    assert code == 1 and found == problems - corrupt
    assert set(listing.read_text().splitlines()) == problems - corrupt
    notes = {line.split()[1] for line in out.splitlines() if line.startswith("note")}
    assert {str(train[i]) for i in (0, 5, 11)} <= notes and str(root / "train" / "c00" / "notes.txt") in notes
    assert "CMYK JPEG" in out and "grayscale JPEG" in out and "PNG, not a JPEG" in out
    assert re.search(r"checked 19 train and 21 val images in 4 classes .*: 11 problems, 8 notes", out.splitlines()[-1])

    code, out = run_check(capsys, root, "--decode", "--jobs", "1")
    assert code == 1 and {line.split()[1] for line in out.splitlines() if line.startswith("PROBLEM")} == problems
    assert "13 problems" in out.splitlines()[-1]


def test_check_exits_0_on_a_clean_set_and_2_without_a_root(tmp_path, capsys):
    root = write_jpeg_folder(tmp_path / "clean", {"train": [2, 2], "val": [1, 1]})
    code, out = run_check(capsys, root, "--decode")
    assert code == 0 and out.splitlines() == [out.splitlines()[-1]] and ": 0 problems, 0 notes" in out
    missing = subprocess.run([sys.executable, "-m", "lowrank_dist.data.check", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and str(tmp_path / "nowhere") in missing.stderr


def test_check_in_several_processes_finds_the_same(planted):
    paths = [str(p) for split in ("train", "val") for p in split_paths(planted, split)] * 20  # past the 512 cut-off
    assert len(paths) >= 512
    assert sorted(check_images(paths, jobs=2)) == sorted(check_images(paths, jobs=1))
