"""Work spread over processes: one core count and one chunked map, for the data index and the check.

The core count is the CPUs this process may run on (its affinity mask), not the machine's: under
SLURM a job's cgroup, or `taskset`, leaves it a few cores of a large node, and starting one process
per core of the node would make them fight over those few.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

SERIAL_BELOW = 512  # fewer items than this are done in this process: starting workers costs more


def ignore_interrupts(*_) -> None:
    """In a worker process (these pools, the torchvision DataLoader's): Ctrl-C at a terminal reaches
    every process of its group, and the train command turns it into a stop request; a worker that
    died of it would end the run instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def usable_cpus() -> int:
    """The CPUs this process may use: os.sched_getaffinity where the system has it, else os.cpu_count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def map_chunks(function: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item], jobs: int) -> list[Result]:
    """`function` applied to consecutive chunks of `items` in `jobs` processes; the chunks' results
    concatenated in order, as `function(items)` would return them. `function` must pickle (a module-level
    function, or a functools.partial of one)."""
    if jobs <= 1 or len(items) < SERIAL_BELOW:
        return list(function(items))
    # about 8 chunks per process, so that one slow chunk (a cold folder on a network file system)
    # does not leave the others idle; at least 64 items, to amortise sending each chunk
    size = max(64, min(1024, len(items) // (jobs * 8)))
    chunks = [items[start:start + size] for start in range(0, len(items), size)]
    with ProcessPoolExecutor(max_workers=jobs, initializer=ignore_interrupts) as pool:  # Ctrl-C: a stop request
        return [result for results in pool.map(function, chunks) for result in results]
