"""The data index: built once (by one process while others wait), read without listing or statting
the images, found stale when a file is added, removed or rewritten, and the crop windows of an
epoch computed from it in one call — the same windows as one sample at a time."""

import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_dist.data import DataError
from lowrank_dist.data import dali as dali_module
from lowrank_dist.data import index as index_module
from lowrank_dist.data.augment import CropWindows
from lowrank_dist.data.index import FOLDER, load_samples, main as index_main

from .helpers import loaders_from, read_codes, write_jpeg_folder

BACKENDS = ["torchvision"] + (["dali"] if dali_module.dali_available() else [])
COUNTS = {"train": [4, 4, 3], "val": [2, 2, 2]}


def loaders(root, backend, **options):
    options = {"batch_size": 4, "image_size": 16, "workers": 0 if backend == "torchvision" else 1, **options}
    return loaders_from(root, backend=backend, dali_device="cpu", **options)


def settle():
    """Folder times have the file system's resolution (a few ms on ext4): let it tick."""
    time.sleep(0.05)


def test_the_command_writes_an_index_that_later_runs_read_without_listing_or_statting_images(tmp_path, capsys,
                                                                                          monkeypatch):
    root = write_jpeg_folder(tmp_path / "data", COUNTS)
    assert index_main([str(root), "--jobs", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: 11 images, 0 bad" in out and "val: 6 images, 0 bad" in out
    assert (root / FOLDER / "train.npz").is_file() and (root / FOLDER / "val.npz").is_file()

    listed, statted, opened = [], [], []
    real_scandir, real_stat, real_open = os.scandir, os.stat, open
    monkeypatch.setattr(os, "scandir", lambda path: listed.append(Path(path)) or real_scandir(path))
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: statted.append(str(path)) or real_stat(path, *a, **k))
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    classes, train, val = load_samples(root)
    assert "data index" not in capsys.readouterr().out  # not rebuilt
    assert classes == ["c00", "c01", "c02"] and len(train) == 11 and len(val) == 6
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 3
    assert set(listed) <= {root / "train", root / "val"}  # the split folders only, for their class folders
    assert not [p for p in statted + opened if p.endswith(".JPEG")]  # no image touched
    assert all(16 <= w <= 64 and 16 <= h <= 64 for w, h in zip(train.widths, train.heights))
    assert train.sizes.tolist() == [(root / "train").joinpath(*Path(p).parts[-2:]).stat().st_size for p in train.paths]


@pytest.mark.parametrize("change", ["file added", "file removed", "file renamed", "class added", "val list edited"])
def test_a_stale_index_is_found_and_rebuilt(tmp_path, capsys, change):
    root = write_jpeg_folder(tmp_path / "data", COUNTS)
    val_list = tmp_path / "val.txt"
    val_list.write_text("val/c00/0000.JPEG 0\n")
    load_samples(root, val_list=val_list)
    assert "data index" in capsys.readouterr().out
    load_samples(root, val_list=val_list)
    assert "data index" not in capsys.readouterr().out  # fresh: read, not rebuilt
    settle()
    expected = {"train": 11, "val": 1}
    if change == "file added":
        (root / "train" / "c01" / "0009.JPEG").write_bytes((root / "train" / "c01" / "0000.JPEG").read_bytes())
        expected["train"] = 12
    elif change == "file removed":
        (root / "train" / "c02" / "0001.JPEG").unlink()
        expected["train"] = 10
    elif change == "file renamed":
        (root / "train" / "c02" / "0001.JPEG").rename(root / "train" / "c02" / "0000b.JPEG")
    elif change == "class added":
        (root / "train" / "c03").mkdir()
        write_jpeg_folder(tmp_path / "extra", {"train": [1]})
        (tmp_path / "extra" / "train" / "c00" / "0000.JPEG").rename(root / "train" / "c03" / "0000.JPEG")
        expected["train"] = 12
    elif change == "val list edited":
        val_list.write_text("val/c00/0000.JPEG 0\nval/c01/0001.JPEG 1\n")
        expected["val"] = 2
    classes, train, val = load_samples(root, val_list=val_list)
    out = capsys.readouterr().out
    assert re.search(r"changed.*rebuilt", out), out
    assert (len(train), len(val)) == (expected["train"], expected["val"])
    if change == "file renamed":
        assert str(root / "train" / "c02" / "0000b.JPEG") in train.paths
    if change == "class added":
        assert classes[-1] == "c03" and train.labels[-1] == 3
    load_samples(root, val_list=val_list)
    assert "data index" not in capsys.readouterr().out  # and fresh again


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_rewritten_in_place_with_another_size_stops_the_loader_naming_it(tmp_path, backend):
    """Its folder's time does not change, so start-up cannot see it: the bytes read can."""
    root = write_jpeg_folder(tmp_path / "data", COUNTS)
    data = loaders(root, backend)
    path = root / "train" / "c01" / "0002.JPEG"
    with open(path, "r+b") as f:  # in place: same inode, the folder untouched
        f.seek(0, os.SEEK_END)
        f.write(b"\0" * 100)  # trailing bytes after the end marker: still a good JPEG
    fresh = loaders(root, backend)  # the index is not rebuilt: nothing at folder level changed
    for train in (data.train, fresh.train):
        with pytest.raises(DataError, match=re.escape(str(path)) + ".*changed since the index was built"):
            list(train.epoch(0))


def test_bad_images_are_recorded_in_the_index_with_the_reason(tmp_path):
    root = write_jpeg_folder(tmp_path / "data", COUNTS)
    (root / "train" / "c00" / "0001.JPEG").write_bytes(b"")
    data = (root / "train" / "c02" / "0000.JPEG").read_bytes()
    (root / "train" / "c02" / "0000.JPEG").write_bytes(data[:len(data) // 2])
    _, train, _ = load_samples(root)
    assert train.bad == {1: "empty (zero-byte) file", 8: train.bad[8]} and "truncated" in train.bad[8]
    assert train.widths[1] == train.heights[1] == 0


def _load_in_child(root: str, barrier, out: Path) -> None:
    barrier.wait()
    _, train, val = load_samples(root)
    out.write_text(f"{len(train)} {len(val)}")


def test_one_process_builds_while_the_others_wait_then_read_it(tmp_path, monkeypatch):
    root = write_jpeg_folder(tmp_path / "data", COUNTS)
    builds = tmp_path / "builds.txt"
    real_build = index_module.build

    def slow_build(root_, split, *args, **kwargs):  # counts builds; slow, so the processes overlap
        with open(builds, "a") as f:
            f.write(f"{split}\n")
        time.sleep(0.5)
        return real_build(root_, split, *args, **kwargs)

    monkeypatch.setattr(index_module, "build", slow_build)  # inherited by the forked processes
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    processes = [context.Process(target=_load_in_child, args=(str(root), barrier, tmp_path / f"out{i}"))
                 for i in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert [(tmp_path / f"out{i}").read_text() for i in range(3)] == ["11 6"] * 3
    assert sorted(builds.read_text().split()) == ["train", "val"]  # once each


def test_a_folder_another_rank_creates_while_this_one_looks_is_still_roots(tmp_path, monkeypatch):
    """The race the test above once lost: this rank finds no index folder, another creates it before
    this one looks again; the folder is ROOT's still, not a second index in the user cache."""
    folder = tmp_path / FOLDER
    real_is_dir = Path.is_dir

    def created_right_after_the_first_look(path):
        answer = real_is_dir(path)
        if path == folder and not answer:
            folder.mkdir()  # the other rank, between this rank's two looks
        return answer

    monkeypatch.setattr(Path, "is_dir", created_right_after_the_first_look)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert index_module.index_folder(tmp_path) == folder
    (tmp_path / "file_root").mkdir()
    (tmp_path / "file_root" / FOLDER).write_text("not a folder")
    assert index_module.index_folder(tmp_path / "file_root").is_relative_to(tmp_path / "cache")


def test_an_unwritable_root_keeps_its_index_in_the_user_cache(tmp_path, monkeypatch):
    root = write_jpeg_folder(tmp_path / "data", COUNTS)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == root else real_access(path, mode))
    _, train, _ = load_samples(root)
    assert len(train) == 11 and not (root / FOLDER).exists()
    assert list((tmp_path / "cache" / "lowrank_dist" / "index").glob("*/train.npz"))


def test_the_index_command_exits_2_naming_a_bad_root(tmp_path, capsys):
    assert index_main([str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


# -- crop windows from the index ------------------------------------------------------------------------


def test_an_epochs_crop_windows_in_one_call_are_each_samples_own():
    plan = CropWindows(image_size=32, val_resize=37, seed=3, min_crop_scale=0.1)
    rng = np.random.default_rng(0)
    indices = rng.permutation(5000)[:700]
    widths, heights = rng.integers(1, 600, 700), rng.integers(1, 600, 700)
    widths[:5], heights[:5] = 1000, 3  # no draw fits: the centred fallback
    for epoch in (0, 7, None):
        boxes = plan.boxes(epoch, indices, widths, heights)
        one_by_one = [plan.box(epoch, i, w, h) for i, w, h in zip(indices, widths, heights)]
        assert [boxes[k] for k in range(700)] == one_by_one
        subset = plan.boxes(epoch, indices[::3], widths[::3], heights[::3])  # any subset: the same numbers
        assert [subset[k] for k in range(len(subset.left))] == one_by_one[::3]
    assert plan.box(0, 1, 1000, 3) == (498, 0, 4, 3, plan.box(0, 1, 1000, 3).flip)  # clamped to 4:3, centred
    assert plan.boxes(1, indices, widths, heights).left.tolist() != plan.boxes(2, indices, widths, heights).left.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaders_read_the_same_pixels_from_a_fresh_or_a_reused_index(tmp_path, backend):
    root = write_jpeg_folder(tmp_path / "data", COUNTS)
    first = [b[0] for b in loaders(root, backend).train.epoch(2)]
    assert (root / FOLDER / "train.npz").is_file()
    second = [b[0] for b in loaders(root, backend).train.epoch(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert sorted(read_codes(torch.cat(first))[0]) == list(range(11))
