"""The process-group layer: rendezvous from each launcher's environment, evaluation summed over real
gloo ranks (every val image counted exactly once at 1–4 ranks, both data back-ends), BN statistics
made consistent across ranks, and the DeepSpeed config generated from ours."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowrank_dist.config import Config
from lowrank_dist.training.engines import deepspeed_config
from lowrank_dist.training.distributed import DistContext, Rendezvous, _first_host, process_group, rendezvous
from lowrank_dist.training.evaluate import evaluate

from .helpers import loaders_from, read_codes, write_jpeg_folder

BACKENDS = ["torchvision"]
try:
    import nvidia.dali  # noqa: F401

    BACKENDS.append("dali")
except ImportError:  # pragma: no cover - the dev install has DALI
    pass


# -- rendezvous --------------------------------------------------------------------------------------


def test_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "23456",
           "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}  # torchrun inside an allocation: torchrun wins
    assert rendezvous(env) == Rendezvous(5, 1, 8, "node7", 23456, "torchrun")


def test_srun_step_environment():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]"}
    rdv = rendezvous(env)
    assert (rdv.rank, rdv.local_rank, rdv.world_size, rdv.launcher) == (3, 1, 4, "srun")
    assert rdv.master_addr in ("gpu007",) and 20000 <= rdv.master_port <= 60000
    assert rendezvous(dict(env, SLURM_PROCID="0")).master_port == rdv.master_port  # every task agrees


SUBMITIT_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                 "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                 "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_STEP_NODELIST": "gpu[007-008]"}


def test_submitit_task_environment(monkeypatch):
    """A task submitit started: its ranks and master from submitit, the port srun's tasks would take
    too (a function of the job id), and the environment left as it was (no RANK for a later call,
    no CUDA_VISIBLE_DEVICES hiding the GPU of the task's local rank)."""
    pytest.importorskip("submitit")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SUBMITIT_TASK.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", "/nonexistent")  # the srun branch below expands the node list by hand
    before = dict(os.environ)
    rdv = rendezvous()
    assert (rdv.rank, rdv.local_rank, rdv.world_size, rdv.master_addr, rdv.launcher) == (3, 1, 4, "gpu007", "submitit")
    assert dict(os.environ) == before
    as_srun = rendezvous(dict(SUBMITIT_TASK))  # not os.environ: read as a plain srun step
    assert as_srun.launcher == "srun" and (as_srun.master_addr, as_srun.master_port) == (rdv.master_addr, rdv.master_port)
    monkeypatch.setenv("MASTER_PORT", "23456")  # an explicit port wins
    assert rendezvous().master_port == 23456


def test_the_sbatch_script_itself_is_one_process():
    """In the batch script (no srun step) SLURM_NTASKS may say 8, but this is one process."""
    assert rendezvous({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}) == Rendezvous()
    assert rendezvous({}) == Rendezvous()


@pytest.mark.parametrize("nodelist, first", [("n1", "n1"), ("n[1-2]", "n1"), ("gpu[003-004,010],cpu1", "gpu003"),
                                             ("a1,b2", "a1")])
def test_first_host_of_a_node_list(nodelist, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # without scontrol, by hand
    assert _first_host(nodelist) == first


# -- evaluation over real process groups ----------------------------------------------------------------


class ColourReader(nn.Module):
    """A 'model' that reads the class painted into each image (tests/helpers.py): perfect top-1,
    so a wrong count or a mislabelled image shows in the numbers."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        classes = torch.tensor(read_codes(images)[1])
        return nn.functional.one_hot(classes, 11).float() * 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _evaluate_rank(rank: int, world_size: int, port: int, root: str, backend: str, out: str) -> None:
    rdv = Rendezvous(rank, 0, world_size, "127.0.0.1", port, "test")
    with process_group(rdv, "cpu", timeout_s=120) as ctx:
        loaders = loaders_from(root, backend=backend, dali_device="cpu", batch_size=8, image_size=16,
                               workers=1 if backend == "dali" else 0,
                               rank=rank, world_size=world_size)
        metrics = evaluate(ColourReader(), loaders.val, ctx)
        Path(out, f"rank{rank}.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def coded(tmp_path_factory) -> Path:
    # 101 val images over 11 classes (9 or 10 each): divides evenly by none of 2, 3, 4
    val = [10 if k < 2 else 9 for k in range(11)]
    return write_jpeg_folder(tmp_path_factory.mktemp("coded"), {"train": [2] * 11, "val": val})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_evaluation_counts_every_val_image_once_across_ranks(tmp_path, coded, backend, world_size):
    mp.spawn(_evaluate_rank, args=(world_size, free_port(), str(coded), backend, str(tmp_path)), nprocs=world_size)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    for metrics in results:  # every rank gets the same global numbers
        assert metrics["count"] == 101 and metrics["top1"] == 100.0 and metrics["top5"] == 100.0
    assert all(m == results[0] for m in results)


def _average_rank(rank: int, port: int, out: str) -> None:
    with process_group(Rendezvous(rank, 0, 2, "127.0.0.1", port, "test"), "cpu", timeout_s=60) as ctx:
        bn = nn.BatchNorm1d(3)
        bn.running_mean.fill_(float(rank))  # each rank saw other batches
        bn.running_var.fill_(1.0 + 2 * rank)
        ctx.average_buffers(bn)
        flag = ctx.any(rank == 1)  # only rank 1 sees a problem; both must stop
        torch.save({"mean": bn.running_mean, "var": bn.running_var, "batches": bn.num_batches_tracked, "any": flag},
                   Path(out, f"rank{rank}.pt"))


def test_batch_norm_statistics_are_averaged_and_a_flag_on_one_rank_reaches_all(tmp_path):
    mp.spawn(_average_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(state["mean"], torch.full((3,), 0.5)) and torch.equal(state["var"], torch.full((3,), 2.0))
        assert state["any"] is True


def test_one_process_needs_no_process_group():
    with process_group(Rendezvous(), "cpu") as ctx:
        assert ctx == DistContext() and not dist.is_initialized()
        assert ctx.any(False) is False and ctx.any(True) is True


def test_a_group_of_one_runs_the_collectives_through_the_backend(monkeypatch):
    """group_of_one (tests/gpu's NCCL test on one GPU): the group exists, the context says
    distributed, and the sums go through torch.distributed; afterwards the group is gone."""
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, **kw: calls.append(tensor.clone()) or real(tensor, **kw))
    with process_group(Rendezvous(master_port=free_port()), "cpu", 60, group_of_one=True) as ctx:
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        assert ctx.distributed and ctx.world_size == 1
        assert torch.equal(ctx.all_reduce_sum(torch.ones(3)), torch.ones(3)) and ctx.any(True) is True
    assert len(calls) == 2 and not dist.is_initialized()


# -- DeepSpeed's JSON from our YAML -------------------------------------------------------------------------


def test_deepspeed_config_is_generated_from_ours_and_the_pass_through_wins(tmp_path):
    (tmp_path / "data").mkdir()
    cfg = Config.model_validate({
        "model": {"name": "tiny_vgg"},
        "data": {"root": str(tmp_path / "data"), "batch_size": 64},
        "optim": {"accumulate": 2},
        "precision": {"amp": "bf16"},
        "distributed": {"engine": "deepspeed", "zero_stage": 2,
                        "deepspeed": {"zero_optimization": {"overlap_comm": False}, "gradient_clipping": 1.0}},
    })
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_micro_batch_size_per_gpu"] == 64 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 64 * 2 * 8
    # ZeRO 1/2 overlap the gradient reduction with backward into contiguous buffers; merged key by key
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}
    cfg.distributed.zero_stage = 0  # nothing is partitioned: nothing to overlap
    assert deepspeed_config(cfg, world_size=8)["zero_optimization"] == {"stage": 0, "overlap_comm": False}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 1.0 and ds["zero_allow_untested_optimizer"] is True


# -- DDP's options: the same steps with and without them ---------------------------------------------------------


DDP_VARIANTS = {  # name: (distributed options, optim.accumulate)
    "plain": ({"static_graph": False}, 2),
    "small_buckets": ({"static_graph": True, "bucket_cap_mb": 0.01}, 2),  # ~10 buckets instead of 1; static_graph
    "bf16": ({"grad_compression": "bf16"}, 2),                            # asked for, off under accumulation
    "plain_1": ({"static_graph": False}, 1),
    "static_graph_1": ({"static_graph": True}, 1),
}


def _ddp_variants_rank(rank: int, port: int, out: str) -> None:
    """Each variant trains the same tiny_vgg 4 optimizer steps of `accumulate` micro-batches (the
    first ones through no_sync), each rank on its own fixed batches; returns the final weights."""
    from lowrank_dist.config import config_from_dict
    from lowrank_dist.training.engines import DDPEngine
    from lowrank_dist.models import build_model

    results = {}
    with process_group(Rendezvous(rank, 0, 2, "127.0.0.1", port, "test"), "cpu", timeout_s=60) as ctx:
        for name, (options, accumulate) in DDP_VARIANTS.items():
            cfg = config_from_dict({"model": {"name": "tiny_vgg"}, "data": {"root": out, "batch_size": 4},
                                    "optim": {"accumulate": accumulate, "lr": 0.1}, "distributed": options}, "test",
                                    check_paths=False)
            torch.manual_seed(0)
            model = build_model({"name": "tiny_vgg", "num_classes": 4, "dropout": 0.0})
            engine = DDPEngine(model, cfg, ctx, torch.device("cpu"), steps_per_epoch=4)
            data = torch.Generator().manual_seed(100 + rank)
            for _ in range(4):
                for micro in range(accumulate):
                    images, labels = torch.randn(4, 3, 16, 16, generator=data), torch.randint(0, 4, (4,), generator=data)
                    with engine.micro_batch(boundary=micro == accumulate - 1):
                        engine.backward(nn.functional.cross_entropy(engine.forward(images), labels) / accumulate)
                engine.step()
            results[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(results, Path(out, f"rank{rank}.pt"))


def test_ddp_options_keep_the_numerics_and_bf16_compression_stays_close(tmp_path):
    """gradient_as_bucket_view (always on), another bucket size, and static_graph leave the weights
    bitwise equal (each bucket's all-reduce sums the same two values per element); bf16 gradient
    compression changes them, by no more than bf16 rounding can over 4 steps, and the ranks agree."""
    mp.spawn(_ddp_variants_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for variants in ranks:
        for name, same_as in (("small_buckets", "plain"), ("static_graph_1", "plain_1")):
            for key, value in variants[same_as].items():
                assert torch.equal(variants[name][key], value), (name, key)
    plain, bf16 = ranks[0]["plain"], ranks[0]["bf16"]
    weights = [k for k, v in plain.items() if v.is_floating_point() and "running" not in k]  # BN statistics are per rank
    for key in weights:
        assert torch.equal(ranks[1]["bf16"][key], bf16[key]), key
    changed = max((bf16[k] - plain[k]).abs().max().item() for k in weights)
    scale = max(plain[k].abs().max().item() for k in weights)
    # 4 updates of lr 0.1 from gradients rounded to 2^-8 relative: far below 1% of the weights' scale
    assert 0 < changed < 1e-2 * scale, (changed, scale)
