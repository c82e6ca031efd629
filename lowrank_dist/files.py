"""Writing files so that a crash, a kill or a full disk never leaves half of one.

Every file the project writes and later reads back (checkpoints, the data index, the execution-plan
cache, reports) goes through `atomic_write`: the bytes go to a temporary beside the target, are
flushed to the disk (fsync), and only then renamed over the target, so a reader sees the old file or
the new one, never a mix; the rename is made durable by syncing the folder. A failure removes the
temporary and re-raises; a write error (a full disk) as the OSError itself, also where the library
writing the bytes wrapped it in its own error (torch's zip writer raises `RuntimeError: [enforce
fail at inline_container.cc] unexpected pos` over the OSError of a short write), so that callers
need to catch OSError only.
"""

from __future__ import annotations

import errno
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
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        cause = write_error_under(error)
        if cause is not None and cause is not error:
            raise cause from None
        raise
    sync_folder(path.parent)


def write_error_under(error: BaseException) -> OSError | None:
    """The OSError `error` is, or was raised while handling (its chain of causes and contexts)."""
    seen = 0
    while error is not None and seen < 10:  # a chain is short; the bound only guards against a cycle
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def write_text_atomic(path: Path, text: str, errors: str = "strict") -> None:
    """`text` as UTF-8 (errors="surrogateescape": file names that are not UTF-8 kept as their bytes)."""
    with atomic_write(path) as f:
        f.write(text.encode(errors=errors))


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


def exit_code_for(error: OSError) -> int:
    """A command's exit code when it cannot write a file it was asked to: 1 for want of room (a
    fault: make room, run again), 2 for a path that cannot be written (no such folder, no permission,
    a file where a folder should be: fix the path)."""
    return 1 if error.errno in (errno.ENOSPC, errno.EDQUOT) else 2


def reason(error: OSError) -> str:
    """An OSError in a few words, without the path the caller names anyway: `[Errno 28] No space left on device`."""
    return f"[Errno {error.errno}] {error.strerror}" if error.errno is not None and error.strerror else str(error)
