"""The paper's recipes learn: each config of configs/paper/ but vgg16_decompose.yaml (docs/paper.md
says why), loaded from its file and trained by the real trainer on real images, leaves chance — at
least 50% val top-1 on 10 classes, five times chance — within a short CPU run, or the test fails
naming the recipe.

The images are scikit-learn's 1,797 handwritten digits: in CIFAR-10's binary format for NIN, and as
an ImageNet-layout JPEG folder for CaffeNet (39×39, its smallest input, or 63×63) and VGG-16 (32×32,
its smallest); the resize before the crop shrinks with it (256:227, 256:224). Each recipe keeps its
model, BN, init, optimizer, lr (with its linear scaling to the smaller batch), momentum, weight
decay and the start of its schedule; only where the data and the run go, the epochs, the batch and
the image size change, and the machine settings a CPU needs (fp32, no DALI, no speed report). The
decompose-and-fine-tune recipe decomposes the dense model that its own dense recipe trained here
first, as a user would.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from lowrank_dist.config import load_config
from lowrank_dist.training.trainer import TrainResult, fit

from .helpers import write_digits, write_digits_cifar

REPO = Path(__file__).resolve().parents[1]
PASS = 50.0  # % val top-1: five times chance on 10 classes


@dataclass(frozen=True)
class Shrunk:
    """How a recipe is shortened for the CPU: only these change."""

    config: str  # relative to configs/
    epochs: int
    batch: int
    image_size: int | None = None  # None: as shipped (NIN's 32×32 CIFAR images)


def _overrides(recipe: Shrunk, root: Path, out: Path, name: str) -> list[str]:
    shipped = load_config(REPO / "configs" / recipe.config, check_paths=False)
    overrides = [
        f"data.root={root}", f"optim.epochs={recipe.epochs}", f"data.batch_size={recipe.batch}",
        f"run.out_dir={out}", f"run.name={name}",
        # the machine: this CPU, in fp32 (bf16 autocast is the GPUs'), the torchvision loader in-process
        "run.device=cpu", "run.speed_report=false", "precision.amp=none", "precision.compile=false",
        "data.backend=torchvision", "data.workers=0",
    ]
    if recipe.image_size is not None:
        # the resize before the crop shrinks with the crop (Caffe's 256 for 227, 256 for 224)
        resize = shipped.data.val_resize or 256
        overrides += [f"data.image_size={recipe.image_size}",
                      f"data.val_resize={round(recipe.image_size * resize / shipped.data.image_size)}"]
    return overrides


@dataclass
class Run:
    recipe: Shrunk
    result: TrainResult
    curve: list[tuple[int, float]]  # (step, val top-1 %) at the end of each epoch
    seconds: float

    @property
    def best(self) -> float:
        """The best epoch's val top-1: the model best.pt keeps, the one a user (or a decompose recipe) takes."""
        return max(top1 for _, top1 in self.curve)


def train(recipe: Shrunk, root: Path, out: Path, name: str, extra: tuple[str, ...] = ()) -> Run:
    start = time.perf_counter()
    cfg = load_config(REPO / "configs" / recipe.config, _overrides(recipe, root, out, name) + list(extra))
    result = fit(cfg)
    lines = (json.loads(line) for line in (result.folder / "metrics.jsonl").read_text().splitlines())
    run = Run(recipe, result, [(m["step"], m["val/top1"]) for m in lines if "val/top1" in m], time.perf_counter() - start)
    curve = ", ".join(f"{top1:.1f}" for _, top1 in run.curve)
    print(f"\n  {recipe.config}: val top-1 by epoch {curve}% ({result.step} steps of batch {recipe.batch}), {run.seconds:.0f} s")
    return run


def assert_learns(run: Run) -> None:
    recipe = run.recipe
    assert run.best >= PASS, (
        f"{recipe.config}: best val top-1 {run.best:.1f}% in {run.result.step} steps of batch {recipe.batch} on the digits,"
        f" under {PASS:.0f}% (five times chance): the recipe as shipped does not learn")


@pytest.fixture(scope="module")
def digits_cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits_cifar")
    assert write_digits_cifar(root) == {"train": 1437, "val": 360, "classes": 10}
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits_folder")
    assert write_digits(root) == {"train": 1437, "val": 360, "classes": 10}
    return root


# -- NIN on CIFAR-10's format ---------------------------------------------------------------------

NIN = [Shrunk("paper/nin_cifar10_lr.yaml", epochs=2, batch=16), Shrunk("paper/nin_cifar10.yaml", epochs=2, batch=16)]


@pytest.mark.parametrize("recipe", NIN, ids=lambda r: Path(r.config).stem)
def test_nin_recipe_learns_the_digits_in_cifar_format(recipe, digits_cifar, tmp_path, capsys):
    with capsys.disabled():
        run = train(recipe, digits_cifar, tmp_path / "runs", "nin")
    assert run.result.step <= 1000  # the bound for the shipped NIN recipes
    assert_learns(run)


# -- CaffeNet-BN from scratch ---------------------------------------------------------------------
# At 63×63, not CaffeNet's smallest input (39×39, where conv3–5 see 2×2 maps): at 39 the low-rank
# CaffeNet-BN was at 17.8% after 2 epochs of 16, at 63 it passes 50% in its second; fc6/fc7 dominate
# the cost at either size. Their lr (0.1 per 256, BN on the 4096-wide fc7 before fc8) makes the val
# top-1 swing from epoch to epoch at the start of the schedule; the best epoch is what is asked.
# VGG-16-BN at 32×32, its smallest input (slow: 125M parameters). At CaffeNet-BN's lr 0.1 it did not
# train here (docs/paper.md), which is why its config takes VGG's 0.01.

FROM_SCRATCH = [
    Shrunk("paper/caffenet_bn.yaml", epochs=3, batch=16, image_size=63),
    Shrunk("paper/caffenet_bn_lr.yaml", epochs=3, batch=16, image_size=63),
    pytest.param(Shrunk("paper/vgg16_bn_lr.yaml", epochs=2, batch=16, image_size=32), marks=pytest.mark.slow),
]


@pytest.mark.parametrize("recipe", FROM_SCRATCH, ids=lambda r: Path(r.config).stem)
def test_bn_recipe_learns_the_digits_from_scratch(recipe, digits_folder, tmp_path, capsys):
    with capsys.disabled():
        run = train(recipe, digits_folder, tmp_path / "runs", "scratch")
    assert_learns(run)


# -- decompose and fine-tune ----------------------------------------------------------------------
# The dense CaffeNet without BN (Caffe's Gaussian init, lr 0.01 per 256: 6.25e-4 at a batch of 16)
# stays at chance for its first ~6 epochs of the digits and passes 50% in its 8th or 9th, hence the
# longest run here (slow: deselected by default; `make test-recipes` runs it, in CI too).

DENSE = Shrunk("paper/caffenet.yaml", epochs=10, batch=32, image_size=39)
DECOMPOSED = Shrunk("paper/caffenet_decompose.yaml", epochs=1, batch=16, image_size=39)


@pytest.mark.slow
def test_dense_caffenet_learns_and_its_decomposition_fine_tunes(digits_folder, tmp_path, capsys):
    with capsys.disabled():
        dense = train(DENSE, digits_folder, tmp_path / "runs", "caffenet")
        assert_learns(dense)
        tuned = train(DECOMPOSED, digits_folder, tmp_path / "runs", "decomposed",
                      extra=(f"model.lowrank.dense_checkpoint={dense.result.folder / 'checkpoints' / 'best.pt'}",))
    assert_learns(tuned)
