"""Launching: the dry run's sbatch script, N local processes, jobs on a real (local) SLURM cluster —
2 nodes × 1 task and 1 node × 2 tasks — preemption and requeue, cancel, and DeepSpeed ZeRO-1/2
against DDP. Every multi-process result is compared with one process training the same global batch.

The SLURM tests need the cluster of slurm/start_local_cluster.sh (.ci/run starts it): in CI they
fail when it is missing, elsewhere they skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.training.checkpoint import CheckpointManager, load_checkpoint

from . import helpers
from .slurm_helpers import require_slurm

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = [sys.executable, str(ROOT / "launch" / "submit.py")]
# Two ranks' all-reduced mean gradient equals one process's over the same 32 samples up to float
# rounding (measured: 3e-8 to 2e-6 after 6 SGD steps, depending on the crops and on the threads per
# process; one wrong sample would move the weights by ~1e-3).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    # 96 train images = 3 global batches of 32: every step sees the same samples at any world size
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=4, train_per_class=24, val_per_class=5, seed=0)
    return root


def write_config(folder: Path, root: Path, name: str, **sections) -> Path:
    """tiny_vgg without BN (per-rank batch statistics would differ from the global batch's) and
    without dropout, so that a 2-rank run must equal a 1-rank run with twice the batch."""
    tree = {
        "run": {"out_dir": str(folder / "runs"), "name": name, "seed": 0, "device": "cpu", "log_every": 1,
                "speed_report": False},
        "model": {"name": "tiny_vgg", "batch_norm": False, "dropout": 0.0, "lowrank": {"speedup": 2.0}},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 16, "image_size": 32, "workers": 0},
        "optim": {"epochs": 2, "lr": 0.05},
    }
    return helpers.write_config(folder / f"{name}.yaml", tree, sections)


def final_state(run_folder: Path) -> dict:
    return load_checkpoint(CheckpointManager(run_folder / "checkpoints", 100).latest())


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOLERANCE, msg=key)


def train_losses(run_folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, synthetic) -> dict:
    """The reference: one process, batch 32 (= 2 ranks × 16)."""
    folder = tmp_path_factory.mktemp("single")
    path = write_config(folder, synthetic, "single", data={"batch_size": 32})
    done = subprocess.run(SUBMIT + ["--config", str(path), "--debug"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_state(folder / "runs" / "single")["model"]


def run(command: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


# -- no SLURM needed -------------------------------------------------------------------------------


def _python_without_torch() -> str:
    """The interpreter the venv was made from: it lacks the project's packages on a clean machine."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    probe = subprocess.run([base, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip(f"{base} has torch: no interpreter without the project's packages to run the command with")
    return base


def test_the_headline_command_typed_as_written_with_a_bare_python_uses_the_venv(tmp_path):
    """`python launch/submit.py ...` after `make setup`, no venv activated: it re-runs under .venv."""
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv in this checkout (make setup makes it)")
    done = subprocess.run([_python_without_torch(), "launch/submit.py", "--config", "configs/googlenet_lr.yaml",
                           "--nodes", "4", "--dry-run", "--set", f"run.out_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=4" in done.stdout


def test_the_command_without_packages_or_venv_is_one_line(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "launch").mkdir(parents=True)
    (checkout / "launch" / "submit.py").write_text((ROOT / "launch" / "submit.py").read_text())
    done = subprocess.run([_python_without_torch(), "launch/submit.py", "--config", "x.yaml"], cwd=checkout,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "lacks torch" in done.stderr and "make setup" in done.stderr, done.stderr


def test_dry_run_prints_the_sbatch_script_for_4_nodes_of_8_gpus(tmp_path):
    done = run(SUBMIT + ["--config", "configs/googlenet_lr.yaml", "--nodes", "4", "--gpus-per-node", "8", "--dry-run",
                         "--set", f"run.out_dir={tmp_path}"])
    script = done.stdout.split("# sbatch script", 1)[1]
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue"):
        assert line in script, line
    assert "srun" in script and "export SUBMITIT_EXECUTOR=slurm" in script
    resolved = json.loads(done.stdout.split("# resolved config", 1)[1].split("# sbatch script", 1)[0])
    assert resolved["model"]["name"] == "googlenet" and resolved["model"]["lowrank"]["mode"] == "factorized"
    assert not list(tmp_path.iterdir()), "a dry run submits and writes nothing"


@pytest.mark.parametrize("argv, gpus, tasks", [([], 1, 1), (["--tasks-per-node", "4"], 4, 4), (["--set", "run.device=cpu"], 0, 1)])
def test_a_gpu_config_asks_slurm_for_a_gpu_per_task_by_default(tmp_path, argv, gpus, tasks):
    """`--nodes 4` alone on a GPU config (run.device auto) must not submit CPU-only tasks."""
    done = run(SUBMIT + ["--config", "configs/googlenet_lr.yaml", "--nodes", "4", "--dry-run",
                         "--set", f"run.out_dir={tmp_path}"] + argv)
    script = done.stdout.split("# sbatch script", 1)[1]
    assert f"#SBATCH --ntasks-per-node={tasks}" in script
    assert (f"#SBATCH --gpus-per-node={gpus}" in script) == (gpus > 0) and ("--gpus-per-node" in script) == (gpus > 0)
    assert ("note: " in done.stderr) == (gpus > 0)


def test_each_task_gives_its_data_threads_all_but_2_cpus_and_warns_when_they_cannot_feed_its_gpus(tmp_path):
    common = SUBMIT + ["--config", "configs/alexnet_lr.yaml", "--gpus-per-node", "8", "--dry-run",
                       "--set", f"run.out_dir={tmp_path}"]
    done = run(common + ["--cpus-per-task", "6", "--set", "data.dali_device=cpu"])
    resolved = json.loads(done.stdout.split("# resolved config", 1)[1].split("# sbatch script", 1)[0])
    assert resolved["data"]["workers"] == 4 and "#SBATCH --cpus-per-task=6" in done.stdout
    # 8 tasks × 4 threads × 260 images/s per core decoding on the CPU, against 8 × 36,128 for AlexNet
    assert "feed about 8,320 images/s per node with dali-cpu" in done.stderr and "will wait for data" in done.stderr
    assert "--cpus-per-task 141" in done.stderr and "data.dali_device: gpu" in done.stderr
    done = run(common + ["--cpus-per-task", "12"])  # the GPU decodes: the host only reads and plans
    assert "wait for data" not in done.stderr and '"workers": 10' in done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "0"], "--nodes: must be >= 1, got 0"),
    (["--gpus-per-node", "8", "--tasks-per-node", "4"], "--tasks-per-node 4 with --gpus-per-node 8"),
    (["--set", "optim.lr=-1"], "optim.lr: Input should be greater than 0"),
])
def test_bad_launch_arguments_exit_2_with_one_line(tmp_path, synthetic, argv, message):
    path = write_config(tmp_path, synthetic, "bad")
    done = subprocess.run(SUBMIT + ["--config", str(path), "--dry-run"] + argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_without_slurm_submit_says_what_to_do_instead(tmp_path, synthetic):
    path = write_config(tmp_path, synthetic, "noslurm")
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python, but no sbatch
    done = subprocess.run(SUBMIT + ["--config", str(path)], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "SLURM is not available here" in done.stderr and "--local" in done.stderr


def test_local_two_processes_match_one_process(tmp_path, synthetic, single_process):
    path = write_config(tmp_path, synthetic, "local")
    run(SUBMIT + ["--config", str(path), "--local", "--tasks-per-node", "2"])
    state = final_state(tmp_path / "runs" / "local")
    assert state["world_size"] == 2 and state["step"] == 6
    assert_same_weights(state["model"], single_process)


@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_zero_matches_ddp_step_by_step_and_resumes(tmp_path, synthetic, stage):
    """ZeRO partitions the optimizer state (and at stage 2 the gradients) but must follow the same
    optimisation: the same loss at every step as DDP; stopped after 4 steps and resumed, the same
    final weights."""
    ddp = write_config(tmp_path, synthetic, "ddp")
    run(SUBMIT + ["--config", str(ddp), "--local", "--tasks-per-node", "2"])
    zero = write_config(tmp_path, synthetic, f"zero{stage}", distributed={"engine": "deepspeed", "zero_stage": stage},
                        run={"checkpoint_every": 2})
    run(SUBMIT + ["--config", str(zero), "--local", "--tasks-per-node", "2", "--set", "run.max_steps=4"])
    shards = sorted(p.name for p in (tmp_path / "runs" / f"zero{stage}" / "checkpoints").glob("*.rank*"))
    assert "step_000000004.rank00001-of-00002.pt" in shards  # every rank saved its partition
    run(SUBMIT + ["--config", str(zero), "--local", "--tasks-per-node", "2"])  # resumes from step 4
    ddp_losses = train_losses(tmp_path / "runs" / "ddp")
    zero_losses = train_losses(tmp_path / "runs" / f"zero{stage}")
    assert [s for s, _ in zero_losses] == [s for s, _ in ddp_losses] == list(range(1, 7))
    for (step, a), (_, b) in zip(ddp_losses, zero_losses):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}: DDP {a}, ZeRO-{stage} {b}"
    assert_same_weights(final_state(tmp_path / "runs" / f"zero{stage}")["model"],
                        final_state(tmp_path / "runs" / "ddp")["model"])


# -- on the local SLURM cluster ----------------------------------------------------------------------


@pytest.mark.parametrize("nodes, tasks", [(2, 1), (1, 2)])
def test_slurm_job_matches_one_process(tmp_path, synthetic, single_process, nodes, tasks):
    require_slurm()
    path = write_config(tmp_path, synthetic, f"slurm{nodes}x{tasks}")
    done = run(SUBMIT + ["--config", str(path), "--nodes", str(nodes), "--tasks-per-node", str(tasks), "--wait",
                         "--time", "10"])
    assert "submitted job" in done.stdout and "tensorboard --logdir" in done.stdout and "finished" in done.stdout
    job_folder = next(p for p in (tmp_path / "runs" / f"slurm{nodes}x{tasks}" / "slurm").iterdir() if p.name.isdigit())
    for rank in (0, 1):  # both ranks ran to the end: each wrote its result
        assert (job_folder / f"{job_folder.name}_{rank}_result.pkl").is_file()
    state = final_state(tmp_path / "runs" / f"slurm{nodes}x{tasks}")
    assert state["world_size"] == 2
    assert_same_weights(state["model"], single_process)


def submit_long_job(tmp_path, synthetic, name, epochs=6):
    """A 1-node × 2-task job of `epochs` epochs (3 steps each) checkpointing every step."""
    import submitit  # noqa: F401 - the tests below talk to the job through submitit

    from lowrank_dist.config import load_config
    from lowrank_dist.launch.jobs import TrainJob, make_executor
    from lowrank_dist.launch.resources import Resources

    path = write_config(tmp_path, synthetic, name, optim={"epochs": epochs}, run={"checkpoint_every": 1})
    cfg = load_config(path)
    executor = make_executor(cfg, Resources(nodes=1, tasks_per_node=2, time_min=10), cfg.run.folder / "slurm")
    return executor.submit(TrainJob(str(path), [])), cfg.run.folder


def wait_for_step(folder: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = CheckpointManager(folder / "checkpoints", 100).latest()
        if latest is not None and int(latest.stem.split("_")[1]) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of step {step} in {folder} after {timeout} s")


def reference(tmp_path, synthetic, name, epochs=6) -> dict:
    path = write_config(tmp_path, synthetic, name, optim={"epochs": epochs}, data={"batch_size": 32})
    run(SUBMIT + ["--config", str(path), "--debug"])
    return final_state(tmp_path / "runs" / name)["model"]


def task0_log(job) -> str:
    return Path(str(job.paths.stdout).replace("%t", "0")).read_text()


@pytest.mark.parametrize("how", ["scontrol requeue", "USR2"])
def test_a_preempted_job_is_requeued_and_ends_with_the_uninterrupted_weights(tmp_path, synthetic, how):
    """`scontrol requeue` (what preemption does: TERM, then KILL after KillWait; SLURM requeues) and
    USR2 (SLURM's warning before the time limit; submitit requeues): the job checkpoints the step it
    is in, comes back, resumes from that checkpoint and ends with the weights of a run that was
    never stopped."""
    require_slurm()
    job, folder = submit_long_job(tmp_path, synthetic, "preempted")
    wait_for_step(folder, 4)
    if how == "scontrol requeue":
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, timeout=30)
    else:
        job._interrupt(timeout=True)  # scancel --signal USR2 alone: the warning before the time limit
    deadline = time.time() + 240
    while not (job.state == "COMPLETED" and "resumed from" in task0_log(job) and (folder / "checkpoints" /
                                                                                  "step_000000018.pt").is_file()):
        assert time.time() < deadline, f"job {job.job_id} is {job.state} 240 s after {how}:\n{task0_log(job)[-2000:]}"
        time.sleep(1)
    log = task0_log(job)
    assert "stop requested: saved step" in log  # it checkpointed the step it was in, not an older one
    stopped_at = int(log.split("stop requested: saved step ")[1].split()[0])
    assert f"resumed from {folder / 'checkpoints'}/step_{stopped_at:09d}.pt" in log
    state = final_state(folder)
    assert state["step"] == 18
    assert_same_weights(state["model"], reference(tmp_path, synthetic, "uninterrupted"))


def test_a_cancelled_job_ends_in_a_clear_state_without_hanging(tmp_path, synthetic):
    require_slurm()
    job, folder = submit_long_job(tmp_path, synthetic, "cancelled", epochs=50)
    wait_for_step(folder, 1)
    job.cancel()
    deadline = time.time() + 60
    while job.state not in ("CANCELLED", "FAILED", "COMPLETED") and not job.state.startswith("CANCELLED"):
        assert time.time() < deadline, f"job still {job.state} 60 s after cancel"
        time.sleep(0.5)
    assert job.state.startswith("CANCELLED")
    with pytest.raises(Exception):  # its result says it did not finish, rather than waiting forever
        job.result()
    assert CheckpointManager(folder / "checkpoints", 100).latest() is not None  # what it wrote is kept
