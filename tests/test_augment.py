"""data.augment "caffe": the authors' crops (shorter side 256, random square, mirror, mean only)."""

import pytest
import torch

from lowrank_dist.data.augment import IMAGENET_MEAN, CropWindows
from lowrank_dist.data.synthetic import make_synthetic

from .helpers import loaders_from
from .test_data import BACKENDS, read_epoch


def test_caffe_crop_is_a_random_square_of_the_image_resized_to_shorter_side_256():
    plan = CropWindows(image_size=227, val_resize=256, augment="caffe")
    lefts, tops, flips = set(), set(), []
    for index in range(400):
        width, height = 300 + index % 211, 256 + index % 97
        box = plan.box(0, index, width, height)
        side = round(227 * min(width, height) / 256)  # 227 px of the resized image, in source pixels
        assert box.width == box.height == side
        assert 0 <= box.left <= width - side and 0 <= box.top <= height - side
        lefts.add(box.left / (width - side))
        tops.add(box.top / max(1, height - side))
        flips.append(box.flip)
    assert min(lefts) < 0.05 and max(lefts) > 0.95  # offsets span the whole range
    assert 150 < sum(flips) < 250
    assert plan.box(None, 0, 512, 256) == (142, 14, 227, 227, False)  # val: the centre square


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    make_synthetic(root, classes=2, train_per_class=4, val_per_class=4, seed=1, min_side=120, max_side=200)
    return root


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs DALI")
def test_dali_and_torchvision_cut_the_same_caffe_crops_and_subtract_the_mean_only(photos):
    options = {"image_size": 64, "batch_size": 8, "augment": "caffe", "dali_device": "cpu", "workers": 1}
    train = {b: loaders_from(photos, backend=b, **options) for b in BACKENDS}
    tv, dali = (read_epoch(train[b].train, 2)[0] for b in BACKENDS)
    assert (tv - dali).abs().mean() < 0.02 * 58  # the threshold of the inception test, in 0..255 units
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    assert float((tv + mean).min()) >= -0.5 and float((tv + mean).max()) <= 255.5  # no std scaling
