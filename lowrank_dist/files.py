"""Writing files so that a crash, a kill or a full disk never leaves half of one.

Every file the project writes and later reads back (checkpoints, the data index, the execution-plan
cache, reports) goes through `atomic_write`: the bytes go to a temporary beside the target, are
flushed to the disk (fsync), and only then renamed over the target, so a reader sees the old file or
the new one, never a mix; the rename is made durable by syncing the folder. A failure removes the
temporary and re-raises.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

# The temporaries' names: `.NAME.tmp-PID`. A process killed mid-write leaves one behind;
# TEMPORARY_FILE lets the owner of a folder recognise and remove them.
TEMPORARY_FILE = re.compile(r"^\..+\.tmp-\d+$")


def temporary_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """`with atomic_write(path) as f: f.write(...)` — `path` appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_for(path)
    try:
        with open(temporary, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text.encode())


def copy_atomic(source: Path, target: Path) -> None:
    with atomic_write(target) as f, open(source, "rb") as src:
        shutil.copyfileobj(src, f)


def sync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems (and Windows) cannot sync a folder; the data itself was synced
    finally:
        os.close(descriptor)
