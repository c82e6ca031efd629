"""One run per run folder: an exclusive lock on it for the whole run.

Two commands on the same `run.out_dir/run.name` would interleave: one run's step checkpoints, the
other's best.pt and config.yaml, both runs' lines in metrics.jsonl, and one run's start-up clean-up
deleting the temporary the other is writing. So rank 0 takes `RUN/.lock` with `fcntl.flock` before
it writes anything there and holds it until the run ends; a second run is refused in one line
naming the holder's host and PID, on every one of its ranks.

The operating system drops a flock when its process ends, however it ends (an exception, SIGKILL,
a node that reboots and so takes its NFS client's locks with it): a crash leaves no stale lock to
clean up by hand. Linux's NFS client (≥ 2.6.12) turns flock into the server's POSIX locks, so two
nodes sharing a run folder exclude each other too; Lustre needs its `flock` mount option. Where the
file system has no locks at all (ENOLCK, EOPNOTSUPP) the run says so once and goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .distributed import DistContext

LOCK_FILE = ".lock"


class RunFolderBusy(RuntimeError):
    """Another run holds the run folder (exit code 2: nothing was trained)."""


def _holder(descriptor: int) -> str:
    """What the lock's holder wrote into it: 'host H, PID P, since T' (empty while it starts)."""
    try:
        return os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def acquire(folder: Path) -> int | None:
    """Lock `folder` (which exists) for this process; its descriptor, to release. Raises
    RunFolderBusy naming the holder; returns None where the file system cannot lock."""
    path = folder / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(descriptor) or "which has not written its host and PID yet"
        os.close(descriptor)
        raise RunFolderBusy(f"run folder {str(folder)!r} is in use by another run ({holder}): wait for it to end, or"
                            " give this one another run.name (or run.out_dir)") from None
    except OSError as error:
        os.close(descriptor)
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        print(f"warning: {path} cannot be locked on this file system ({error.strerror}): nothing stops a second run"
              " on this run folder", file=sys.stderr)
        return None
    try:  # who holds it, for a second run's refusal; the lock works without it (a full disk)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"host {socket.gethostname()}, PID {os.getpid()}, since"
                              f" {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    except OSError:
        pass
    return descriptor


@contextmanager
def run_folder_lock(folder: Path, dist_ctx: DistContext) -> Iterator[None]:
    """Rank 0 holds the lock on `folder` inside; every rank raises RunFolderBusy if it is taken."""
    descriptor, refusal = None, None
    if dist_ctx.is_main:
        try:
            descriptor = acquire(folder)
        except RunFolderBusy as busy:
            refusal = str(busy)
    refusal = dist_ctx.broadcast_object(refusal)  # the other ranks must not start either
    if refusal is not None:
        raise RunFolderBusy(refusal)
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)  # closing drops the lock; the file stays (removing it would race a new holder)
