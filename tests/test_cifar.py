"""The CIFAR-10 binary reader: records read back exactly, both back-ends alike, clear errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_dist.data import DataError
from lowrank_dist.data.dali import dali_available

from .helpers import loaders_from, write_cifar_batches


def _known_set(root: Path, train: int = 23, val: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(train, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=train)
    val_images = rng.integers(0, 256, size=(val, 32, 32, 3), dtype=np.uint8)
    val_labels = rng.integers(0, 10, size=val)
    write_cifar_batches(root, images, labels, val_images, val_labels)
    return images, labels, val_images, val_labels


def _loaders(root, **options):
    return loaders_from(root, format="cifar10", image_size=32, batch_size=4, workers=1, **options)


def test_records_come_back_exactly_standardised_by_the_train_statistics(tmp_path):
    images, labels, val_images, val_labels = _known_set(tmp_path)
    loaders = _loaders(tmp_path, backend="torchvision", hflip=False)
    assert loaders.num_train == 23 and len(loaders.val.samples) == 7 and loaders.classes[0] == "airplane"
    pixels = images.reshape(-1, 3).astype(np.float64)
    mean, std = pixels.mean(axis=0), pixels.std(axis=0)
    expected = (val_images.astype(np.float64) - mean) / std
    got, got_labels = [], []
    for batch, target, valid in loaders.val:
        got.append(batch[valid].double().permute(0, 2, 3, 1).numpy())
        got_labels.append(target[valid].numpy())
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=0, atol=1e-5)
    assert np.concatenate(got_labels).tolist() == val_labels.tolist()
    # the train epoch covers every record once, each with its own label
    seen = {}
    for batch, target in loaders.train.epoch(0):
        raw = (batch.double().permute(0, 2, 3, 1).numpy() * std + mean).round().astype(np.uint8)
        for image, label in zip(raw, target.tolist()):
            index = int(np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0])
            seen[index] = label
    assert seen == {i: int(label) for i, label in enumerate(labels)}


def test_mirrors_are_per_sample_and_epoch(tmp_path):
    images, *_ = _known_set(tmp_path)
    loaders = _loaders(tmp_path, backend="torchvision", hflip=True)
    flips = []
    for epoch in (0, 1):
        order = loaders.train.indices(epoch)
        batches = torch.cat([batch for batch, _ in loaders.train.epoch(epoch)])
        plain = _loaders(tmp_path, backend="torchvision", hflip=False).train
        straight = torch.cat([batch for batch, _ in plain.epoch(epoch)])
        mirrored = (batches - straight.flip(3)).abs().amax(dim=(1, 2, 3)) < 1e-6
        same = (batches - straight).abs().amax(dim=(1, 2, 3)) < 1e-6
        assert bool((mirrored ^ same).all())  # each image is either itself or its mirror
        flips.append(dict(zip(order.tolist(), mirrored.tolist())))
    assert 0 < sum(flips[0].values()) < len(images) and flips[0] != flips[1]


@pytest.mark.skipif(not dali_available(), reason="DALI is not installed")
def test_dali_feeds_the_same_batches_as_torchvision(tmp_path):
    _known_set(tmp_path)
    for split in ("train", "val"):
        batches = {}
        for backend in ("torchvision", "dali"):
            loaders = _loaders(tmp_path, backend=backend, dali_device="cpu", hflip=True)
            assert loaders.backend == ("torchvision" if backend == "torchvision" else "dali-cpu")
            if split == "train":
                batches[backend] = [(b, t) for b, t in loaders.train.epoch(3)]
            else:
                batches[backend] = [(b, t) for b, t, _ in loaders.val]
        for (a, la), (b, lb) in zip(batches["torchvision"], batches["dali"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            assert la.tolist() == lb.tolist()


def test_missing_batch_wrong_size_and_pickled_version_are_named(tmp_path):
    _known_set(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match=r"CIFAR-10 batch '.*data_batch_3.bin' is missing: data.root must be the extracted"):
        _loaders(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x04pickle")  # the python version's name
    with pytest.raises(DataError, match=r"data_batch_3 without .bin is the pickled Python version, which is not read"):
        _loaders(tmp_path)
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x00" * (3073 * 2 + 5))
    with pytest.raises(DataError, match=r"data_batch_3.bin' has 6,151 bytes, not a whole number of 3,073-byte records"):
        _loaders(tmp_path)
    (tmp_path / "data_batch_3.bin").write_bytes(b"\x0c" + b"\x00" * 3072)
    with pytest.raises(DataError, match=r"data_batch_3.bin': record 0 has label 12, expected 0..9"):
        _loaders(tmp_path)


def test_cifar_refuses_imagenet_crops_and_other_sizes(tmp_path):
    _known_set(tmp_path)
    with pytest.raises(DataError, match="data.augment: 'caffe' crops ImageNet-sized images"):
        _loaders(tmp_path, augment="caffe")
    with pytest.raises(DataError, match="data.image_size: CIFAR-10 images are 32×32, got 28"):
        loaders_from(tmp_path, format="cifar10", image_size=28)
