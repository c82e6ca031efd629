"""What we ask SLURM, through its own commands: what a partition has (`sinfo`), where a job stands
(`squeue`, then `sacct`, then `scontrol`), and waiting for a job to end.

    partition = query_partition("gpu")          # nodes, CPUs and GPUs per node, time limit
    partition.fits(nodes=4, cpus=32, gpus=8)    # the nodes that could run one node's share of a job
    end = wait_for_job("1234")                  # JobStatus once it ended, or a reason it never will start

Every failure of a SLURM command is a SlurmError whose message is one line with SLURM's own words.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from ..config import ConfigError

COMMAND_TIMEOUT_S = 60  # an unreachable controller makes each command retry for ~10 s first


class SlurmError(RuntimeError):
    """SLURM did not answer, or refused; the message is one line."""


def slurm_command(*args: str) -> str:
    """Run a SLURM command; its stdout, or SlurmError with its (first) error line."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise SlurmError(f"{args[0]} is not installed here") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not answer within {COMMAND_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise SlurmError(f"`{args[0]}` failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    return done.stdout


# -- what a partition has ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    gpus: int
    state: str  # sinfo's: idle, mixed, allocated, down, drained, ...

    @property
    def up(self) -> bool:
        return not re.match(r"(down|drain|fail|future|inval|maint|reboot|power)", self.state)


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: tuple[Node, ...]
    max_time_min: int | None = None  # None: no limit
    available: bool = True  # sinfo's %a: 'up' (jobs start), else down, drain or inactive

    @property
    def cpus_per_node(self) -> int:
        """The most CPUs one node has."""
        return max(node.cpus for node in self.nodes)

    @property
    def gpus_per_node(self) -> int:
        """The most GPUs one node has (0: no GPUs in this partition)."""
        return max(node.gpus for node in self.nodes)

    def fits(self, cpus: int, gpus: int) -> list[Node]:
        """The nodes that have `cpus` CPUs and `gpus` GPUs (one node's share of a job)."""
        return [node for node in self.nodes if node.cpus >= cpus and node.gpus >= gpus]

    def cpus_on(self, nodes: int, gpus: int) -> int:
        """The most CPUs each of `nodes` nodes with `gpus` GPUs offers (0: not that many such nodes)."""
        counts = sorted((node.cpus for node in self.nodes if node.gpus >= gpus), reverse=True)
        return counts[nodes - 1] if len(counts) >= nodes else 0

    def describe(self) -> str:
        """'partition debug (2 nodes of 2 CPUs, no GPUs)' (node kinds grouped, the commonest first)."""
        kinds: dict[tuple[int, int], int] = {}
        for node in self.nodes:
            kinds[node.cpus, node.gpus] = kinds.get((node.cpus, node.gpus), 0) + 1
        parts = [f"{count} node{'s' * (count > 1)} of {cpus} CPU{'s' * (cpus > 1)}"
                 + (f" and {gpus} GPU{'s' * (gpus > 1)}" if gpus else "")
                 for (cpus, gpus), count in sorted(kinds.items(), key=lambda kind: -kind[1])]
        return f"partition {self.name} ({', '.join(parts)}" + (")" if self.gpus_per_node else ", no GPUs)")


def gpus_in(gres: str) -> int:
    """GPUs in sinfo's %G of one node: 'gpu:8', 'gpu:a100:4(S:0-1)', 'gpu:a100:2,gpu:v100:2,mps:100', '(null)'."""
    return sum(int(count) for count in re.findall(r"(?:^|,)gpu(?::[^:,()]+)?:(\d+)", gres))


def minutes_in(limit: str) -> int | None:
    """sinfo's %l ('infinite', '30:00', '2:00:00', '1-12:00:00') in minutes; None without a limit."""
    if limit in {"infinite", "n/a", "UNLIMITED"}:
        return None
    days, _, clock = limit.rpartition("-")
    fields = [int(f) for f in clock.split(":")]
    hours, minutes, seconds = ([0, 0] + fields)[-3:] if len(fields) > 1 else (0, fields[0], 0)
    return int(days or 0) * 24 * 60 + hours * 60 + minutes + (seconds > 0)


def query_partition(name: str | None = None) -> Partition:
    """What `name` (None: the cluster's default partition) has, from one `sinfo` call. A partition
    that does not exist is a ConfigError; sinfo failing (no controller), a SlurmError."""
    rows = [line.split("|") for line in slurm_command("sinfo", "-h", "-N", "-o", "%P|%N|%c|%G|%T|%l|%a").splitlines()
            if line.count("|") == 6]
    names = sorted({row[0] for row in rows})
    if name is None:
        defaults = [n for n in names if n.endswith("*")]
        if not defaults:
            raise ConfigError(f"this cluster has no default partition: give --partition (one of {', '.join(names)})")
        name = defaults[0]
    name = name.rstrip("*")
    mine = [row for row in rows if row[0].rstrip("*") == name]
    if not mine:
        raise ConfigError(f"--partition {name}: SLURM has no such partition (it has: "
                         f"{', '.join(n.rstrip('*') for n in names) or 'none'})")
    nodes = tuple(Node(node, int(cpus.rstrip("+")), gpus_in(gres), state) for _, node, cpus, gres, state, _, _ in mine)
    return Partition(name, nodes, minutes_in(mine[0][5]), mine[0][6] == "up")


# -- where a job stands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobStatus:
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, NODE_FAIL, OUT_OF_MEMORY, TIMEOUT, CANCELLED, ...
    reason: str = ""  # squeue's reason while pending; sacct's exit code or reason after
    nodes: str = ""

    @property
    def finished(self) -> bool:
        return self.state not in {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                                  "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED", ""}


def job_status(job_id: str) -> JobStatus:
    """squeue while the job is queued or running; once it ended, accounting (sacct, which has the exit
    code), else the controller's memory of it (scontrol, on clusters without accounting)."""
    try:
        queued = slurm_command("squeue", "-h", "-j", job_id, "-o", "%T|%r|%N").strip().splitlines()
    except SlurmError as error:
        if "Invalid job id" not in str(error):  # squeue's answer for a job the controller has forgotten
            raise
        queued = []
    if queued and queued[0].count("|") == 2:
        state, reason, nodes = queued[0].split("|")
        status = JobStatus(state, "" if reason == "None" else reason, nodes)
        if not status.finished:
            return status
    try:
        rows = slurm_command("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode,Reason,NodeList").splitlines()
        if rows and rows[-1].count("|") == 3:
            state, exit_code, reason, nodes = rows[-1].split("|")
            return JobStatus(state.split()[0], f"exit code {exit_code}" + (f", {reason}" if reason not in {"", "None"} else ""),
                             nodes)
    except SlurmError:
        pass  # no accounting here
    fields = dict(field.split("=", 1) for field in slurm_command("scontrol", "show", "job", "-o", job_id).split()
                  if "=" in field)
    return JobStatus(fields.get("JobState", ""), f"exit code {fields.get('ExitCode', '?')}", fields.get("NodeList", ""))


# Pending reasons that never clear by waiting: the job asks for more than the partition or the
# account's per-job limits allow. SLURM keeps such a job queued forever.
NEVER_STARTS = {
    "PartitionConfig": "the job asks for more than the partition's nodes have (CPUs, GPUs, memory)",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows",
    "PartitionTimeLimit": "the job's --time is above the partition's time limit",
    "BadConstraints": "no node has the features, memory or CPUs the job asks for",
    "InvalidAccount": "the job's account is not valid", "InvalidQOS": "the job's QOS is not valid",
    "DependencyNeverSatisfied": "the job it depends on failed",
    "QOSMaxWallDurationPerJobLimit": "the job's --time is above its QOS's limit",
    "AssocMaxWallDurationPerJobLimit": "the job's --time is above its account's limit",
    "QOSMaxCpuPerJobLimit": "the job asks for more CPUs than its QOS allows one job",
    "QOSMaxGRESPerJob": "the job asks for more GPUs than its QOS allows one job",
    "QOSMaxNodePerJobLimit": "the job asks for more nodes than its QOS allows one job",
    "AssocMaxCpuPerJobLimit": "the job asks for more CPUs than its account allows one job",
    "AssocMaxNodesPerJobLimit": "the job asks for more nodes than its account allows one job",
}
# ... and reasons that only an administrator (or the user) clears: nodes down, partition down, a hold.
ADMIN_ONLY = {
    "ReqNodeNotAvail": "the nodes it needs are down, drained or reserved",
    "NodeDown": "a node it needs is down",
    "PartitionDown": "the partition is down", "PartitionInactive": "the partition is inactive",
    "JobHeldAdmin": "an administrator holds it", "JobHeldUser": "it is held (scontrol release to let it start)",
}


def stuck_reason(status: JobStatus) -> str | None:
    """SLURM's reason if `status` is a pending job that will not start by waiting, else None."""
    if status.state != "PENDING":
        return None
    key = status.reason.split(",")[0].strip()  # 'ReqNodeNotAvail, UnavailableNodes:n2'
    return key if key in NEVER_STARTS or key in ADMIN_ONLY else None


def wait_for_job(job_id: str, every_s: float = 2.0, on_change: Callable[[JobStatus], None] | None = None,
                 pending_grace_s: float = 0.0) -> JobStatus:
    """Poll until the job ends (its final JobStatus) or is pending for a reason that does not clear
    by waiting (that PENDING JobStatus; `stuck_reason` names it) for longer than `pending_grace_s`.
    Through requeues (preemption, time limit) it keeps waiting: the job id stays the same."""
    last, stuck_since = None, None
    while True:
        status = job_status(job_id)
        if status != last and on_change is not None:
            on_change(status)
        last = status
        if status.finished:
            return status
        if stuck_reason(status) is not None:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since >= pending_grace_s:
                return status
        else:
            stuck_since = None
        time.sleep(every_s)
