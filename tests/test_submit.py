"""`launch/submit.py` fits its request to the partition and ends every SLURM failure in one line.

On the real local cluster (slurm/start_local_cluster.sh: partition debug, nodes n1 n2 of 2 CPUs, no
GPUs): a GPU-less partition means CPU tasks and CPUs per task are capped by a node's, so the
README's `--nodes 2` command runs as written; requests that can never run there are refused before
submitting, naming the flag; an unreachable controller, sbatch's refusal, a job that FAILED and a
job pending for a reason that never clears (PartitionConfig) each end in one line. Without SLURM:
the partition and time-limit parsing, the lines for states the local cluster cannot produce
(NODE_FAIL, OUT_OF_MEMORY, ReqNodeNotAvail), and `--local` keeping our exit codes 2 and 3.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowrank_dist.config import ConfigError, load_config
from lowrank_dist.data.synthetic import make_synthetic
from lowrank_dist.training.checkpoint import CheckpointManager
from lowrank_dist.launch.jobs import TrainJob, job_ended_badly, job_stuck, make_executor, submit
from lowrank_dist.launch.resources import Resources, plan_resources
from lowrank_dist.launch.slurm import JobStatus, Node, Partition, SlurmError, gpus_in, job_status, minutes_in, query_partition

from . import helpers
from .slurm_helpers import cancel, require_slurm, wait_for

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = [sys.executable, str(ROOT / "launch" / "submit.py")]


def load_submit():
    """What `python launch/submit.py` runs."""
    from lowrank_dist.launch import cli

    return cli


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    make_synthetic(root, classes=2, train_per_class=8, val_per_class=2, seed=0)
    return root


def write_config(folder: Path, root: Path, name: str = "r", **sections) -> Path:
    """Like configs/debug.yaml where it matters here: run.device auto, data.workers 2 (3 CPUs wanted)."""
    tree = {
        "run": {"out_dir": str(folder / "runs"), "name": name, "seed": 0, "device": "auto", "speed_report": False},
        "model": {"name": "tiny_vgg", "lowrank": {"speedup": 2.0}},
        "data": {"root": str(root), "backend": "torchvision", "batch_size": 8, "image_size": 32, "workers": 2},
        "optim": {"epochs": 1, "lr": 0.05},
        "distributed": {"timeout_s": 30},
    }
    return helpers.write_config(folder / f"{name}.yaml", tree, sections)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), err
    return lines[0]


# -- without SLURM ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gres, gpus", [("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4),
                                        ("gpu:a100:2,gpu:v100:2,mps:100", 4), ("mps:100,gpu:1", 1)])
def test_gpus_per_node_from_sinfo_gres(gres, gpus):
    assert gpus_in(gres) == gpus


@pytest.mark.parametrize("limit, minutes", [("infinite", None), ("30:00", 30), ("2:00:00", 120), ("1-12:00:00", 2160),
                                            ("45", 45), ("1:30", 2)])
def test_partition_time_limit_from_sinfo(limit, minutes):
    assert minutes_in(limit) == minutes


GPU_PARTITION = Partition("gpu", (Node("g1", 64, 8, "idle"), Node("g2", 64, 8, "mixed"), Node("g3", 64, 8, "drained"),
                                  Node("c1", 16, 0, "idle")), max_time_min=2880)


def config(tmp_path, **run) -> object:
    path = helpers.write_config(tmp_path / "c.yaml", {"model": {"name": "tiny_vgg"}, "data": {"root": str(tmp_path),
                                                                                            "workers": 8}}, {"run": run})
    return load_config(path, check_paths=False)


def test_defaults_fit_the_partition(tmp_path):
    cfg = config(tmp_path)  # run.device auto, data.workers 8
    resources, notes = plan_resources(cfg, nodes=2, tasks_per_node=8, partition=GPU_PARTITION)
    assert (resources.gpus_per_node, resources.tasks_per_node, resources.cpus_per_task) == (8, 8, 8)
    assert resources.time_min == 1440
    resources, notes = plan_resources(cfg, nodes=1, gpus_per_node=0, tasks_per_node=4,
                                      partition=Partition("cpu", (Node("c1", 16, 0, "idle"),), max_time_min=60))
    assert (resources.cpus_per_task, resources.time_min) == (4, 60)  # 16 CPUs / 4 tasks; the partition's limit
    assert any("capped by the 16 CPUs" in note for note in notes) and any("--time 60" in note for note in notes)
    resources, notes = plan_resources(cfg, nodes=3, tasks_per_node=8, partition=GPU_PARTITION)
    assert any("only 2 of the 3 nodes that fit are up (g3 drained)" in note for note in notes)


@pytest.mark.parametrize("request_, flag", [
    (dict(nodes=5, tasks_per_node=8), r"--nodes 5 × .* cannot run on partition gpu \(3 nodes of 64 CPUs and 8 GPUs,"
                                      r" 1 node of 16 CPUs\); change --nodes \(at most 4\)$"),
    (dict(nodes=1, gpus_per_node=16), r"change --gpus-per-node \(at most 8\) or --partition$"),
    (dict(nodes=2, tasks_per_node=8, cpus_per_task=9), r"change --cpus-per-task \(at most 8 at 8 task\(s\) per node\)$"),
    (dict(nodes=4, gpus_per_node=0, cpus_per_task=20), r"change --nodes \(only 3 of its nodes have 20 CPUs\)$"),
    (dict(nodes=1, time_min=3000), r"^--time 3000: partition gpu allows at most 2880 minutes per job; lower --time"),
])
def test_a_request_the_partition_cannot_meet_is_refused_naming_the_flag(tmp_path, request_, flag):
    with pytest.raises(ConfigError, match=flag):
        plan_resources(config(tmp_path), partition=GPU_PARTITION, **request_)


def test_endings_the_local_cluster_cannot_produce_are_one_line(tmp_path):
    class Job:
        job_id = "42"

        class paths:
            stderr = tmp_path / "42_%t_log.err"

        def exception(self):
            raise AssertionError("only read for FAILED")

    for state, words in [("NODE_FAIL", "ended because a node it ran on failed"),
                         ("OUT_OF_MEMORY", r"ran out of memory \(OUT_OF_MEMORY, exit code 0:125\)\..*lower"
                                           r" data\.batch_size or data\.workers"),
                         ("TIMEOUT", "raise --time or --max-requeues")]:
        line = job_ended_badly(Job(), JobStatus(state, "exit code 0:125"), tmp_path / "step_000000004.pt")
        assert "\n" not in line and re.search(f"^job 42 .*{words}", line), line
        assert f"last checkpoint: {tmp_path / 'step_000000004.pt'}" in line and "42_0_log.err" in line
    line, cancel_it = job_stuck("7", JobStatus("PENDING", "ReqNodeNotAvail, UnavailableNodes:n2"))
    assert not cancel_it and "stays queued" in line and "scancel 7" in line and "ReqNodeNotAvail" in line
    line, cancel_it = job_stuck("7", JobStatus("PENDING", "PartitionTimeLimit"))
    assert cancel_it and "can never start" in line and "--time" in line


def test_local_keeps_the_exit_code_of_bad_input(tmp_path, synthetic):
    """A data problem found by the ranks (an empty class folder): torchrun alone would exit 1."""
    root = tmp_path / "data"
    subprocess.run(["cp", "-r", str(synthetic), str(root)], check=True)
    (root / "train" / "zzz").mkdir()
    done = subprocess.run(SUBMIT + ["--config", str(write_config(tmp_path, root, data={"workers": 0})), "--local",
                                    "--tasks-per-node", "2"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and re.search(r"error \(rank \d of 2\): .*zzz", done.stderr), done.stderr


def test_local_stopped_by_a_signal_exits_3_with_a_checkpoint(tmp_path, synthetic):
    """TERM to the launcher (what a scheduler or `kill` sends): every rank checkpoints its step, exit 3."""
    path = write_config(tmp_path, synthetic, optim={"epochs": 200}, run={"checkpoint_every": 0},
                        data={"workers": 0, "batch_size": 4})
    launcher = subprocess.Popen(SUBMIT + ["--config", str(path), "--local", "--tasks-per-node", "2"], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
        deadline = time.time() + 180
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
            assert time.time() < deadline and launcher.poll() is None, launcher.communicate()[1][-3000:]
            time.sleep(0.2)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode == 3, err[-3000:]
    assert "Traceback" not in err and re.search(r"preempted \(rank 0 of 2\): stopped on request at step \d+", err), err
    assert CheckpointManager(tmp_path / "runs" / "r" / "checkpoints", 5).latest() is not None


# -- on the local SLURM cluster -------------------------------------------------------------------------------


@pytest.fixture
def cluster():
    require_slurm()


def test_the_local_partition_is_read_from_sinfo(cluster):
    partition = query_partition()
    assert partition.name == "debug" and [(n.name, n.cpus, n.gpus) for n in partition.nodes] == [("n1", 2, 0), ("n2", 2, 0)]
    assert partition.describe() == "partition debug (2 nodes of 2 CPUs, no GPUs)"
    with pytest.raises(ConfigError, match=r"^--partition gpu: SLURM has no such partition \(it has: debug\)$"):
        query_partition("gpu")


def test_the_readme_command_runs_as_written_on_the_local_cluster(cluster, tmp_path, synthetic):
    """`submit.py --config configs/debug.yaml --nodes 2 --set data.root=...`: run.device auto and
    data.workers 2 asked for a GPU and 3 CPUs per task; here it gets CPU tasks of 2 CPUs and runs."""
    path = write_config(tmp_path, synthetic)
    done = subprocess.run(SUBMIT + ["--config", str(path), "--nodes", "2", "--wait"], capture_output=True, text=True,
                          timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "note: CPU tasks, as run.device is 'auto' and partition debug (2 nodes of 2 CPUs, no GPUs)" in done.stderr
    assert "note: --cpus-per-task 2 (data.workers + 2 = 4 capped by the 2 CPUs" in done.stderr
    assert re.search(r"submitted job \d+: 2 node\(s\) × 1 task\(s\) × 2 CPU\(s\) on partition debug", done.stdout)
    assert re.search(r"job \d+ finished: \{.*\"top1\"", done.stdout), done.stdout


@pytest.mark.parametrize("argv, message", [
    (["--nodes", "2", "--cpus-per-task", "3"], r"--nodes 2 × --tasks-per-node 1 × --cpus-per-task 3 cannot run on"
                                               r" partition debug \(2 nodes of 2 CPUs, no GPUs\); change --cpus-per-task"
                                               r" \(at most 2 at 1 task\(s\) per node\)$"),
    (["--nodes", "3"], r"change --nodes \(at most 2\)$"),
    (["--gpus-per-node", "1"], r"with --gpus-per-node 1 cannot run on .*; change --gpus-per-node to 0 \(CPU tasks\) or"
                               r" --partition$"),
    (["--tasks-per-node", "3"], r"change --tasks-per-node \(at most 2\)$"),
    (["--partition", "gpu"], r"--partition gpu: SLURM has no such partition \(it has: debug\)$"),
    (["--set", "run.device=cuda"], r"run\.device is 'cuda' and partition debug \(.*\); choose a --partition with GPUs"),
])
def test_an_impossible_request_is_refused_before_submitting(cluster, tmp_path, synthetic, capsys, argv, message):
    assert load_submit().main(["--config", str(write_config(tmp_path, synthetic))] + argv) == 2
    assert re.search(message, one_error_line(capsys.readouterr().err))
    assert not (tmp_path / "runs" / "r" / "slurm").exists()  # submitit made no job folder: nothing was submitted


def test_an_unreachable_controller_is_one_line(cluster, tmp_path, synthetic, monkeypatch, capsys):
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    bad = tmp_path / "slurm.conf"
    bad.write_text(re.sub(r"(?m)^SlurmctldPort=.*\n", "", conf).replace("SlurmctldHost=", "SlurmctldPort=1\nSlurmctldHost=", 1))
    monkeypatch.setenv("SLURM_CONF", str(bad))  # a controller nobody listens for
    assert load_submit().main(["--config", str(write_config(tmp_path, synthetic))]) == 1
    assert re.search(r"^error: could not ask SLURM what the partition has \(`sinfo` failed: .*Unable to contact slurm"
                     r" controller.*\); check that its controller runs", one_error_line(capsys.readouterr().err))


def test_sbatchs_refusal_is_one_line(cluster, tmp_path, synthetic):
    cfg = load_config(write_config(tmp_path, synthetic))
    executor = make_executor(cfg, Resources(partition="nosuch", time_min=5), tmp_path / "slurm")
    with pytest.raises(SlurmError) as refused:
        submit(executor, TrainJob(str(tmp_path / "r.yaml"), []))
    assert re.fullmatch(r"sbatch refused the job: .*invalid partition.*", str(refused.value), re.IGNORECASE)


def test_a_job_that_can_never_start_is_cancelled_with_slurms_reason(cluster, tmp_path, synthetic, capsys):
    """2 nodes × 3 CPUs per task on nodes of 2 (the request submit.py itself refuses, sent past it): SLURM keeps
    it pending with PartitionConfig forever; --wait says so in one line and cancels it."""
    cfg = load_config(write_config(tmp_path, synthetic))
    job = submit(make_executor(cfg, Resources(nodes=2, cpus_per_task=3, time_min=5), tmp_path / "slurm"),
                 TrainJob(str(tmp_path / "r.yaml"), []))
    try:
        assert load_submit().wait(job, cfg) == 2
        out, err = capsys.readouterr()
        assert re.search(rf"^error: job {job.job_id} can never start: SLURM's reason is PartitionConfig \(.*\);"
                         r" cancelled it$", one_error_line(err))
        wait_for(lambda: job_status(job.job_id).state == "CANCELLED", 60, f"job {job.job_id} to be cancelled")
    finally:
        cancel(job.job_id)


def test_a_failed_job_is_one_line_with_the_tasks_error(cluster, tmp_path, synthetic):
    root = tmp_path / "data"
    subprocess.run(["cp", "-r", str(synthetic), str(root)], check=True)
    (next((root / "train").iterdir()) / "broken.JPEG").write_bytes(b"")  # found when the task reads it
    path = write_config(tmp_path, root, data={"workers": 0})
    done = subprocess.run(SUBMIT + ["--config", str(path), "--wait", "--time", "5"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]
    line = one_error_line(done.stderr)
    assert re.search(r"^error: job \d+ failed \(FAILED, exit code 1:0; DataError: .*broken\.JPEG.*\)\. Logs: .*_0_log\.err"
                     r" \(one per task\); last checkpoint: none yet\. fix that and submit the same command again", line), line
