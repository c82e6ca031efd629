"""The data index: every image of a split with its label, byte size, width, height and whether its
bytes pass the header/end-marker check — built once, read by every later run.

    python -m lowrank_dist.data.index ROOT [--train-list FILE] [--val-list FILE] [--jobs N]

Why. Without it, every rank of every (re)start lists the split's folders and stats each file (1.28M
files in 1,000 folders for ImageNet, times 32 ranks for 4 nodes, often on a network file system),
and learns each image's size only by reading the file when it is batched — so crop windows could
only be drawn one sample at a time, on the thread that fed the loader. With the index a rank reads
one file, and the crop windows of a whole epoch are one vectorised call (`augment.CropWindows.boxes`).

Damaged. An index that cannot be read or holds what `save` never writes (truncated, empty, arrays of
the wrong length or type, labels out of range) is rebuilt, with a warning saying what was wrong;
one that cannot be saved (a full disk, nowhere writable) only costs the next run the same build.

Where. ROOT/.lowrank_index/<split>.npz (a split given by a list file: list-<name>-<hash>.npz);
when ROOT is not writable, ~/.cache/lowrank_dist/index/<hash of ROOT>/ instead. Paths are stored
relative to ROOT, so the data set can move with its index.

When. The first run builds what is missing (the command above does it ahead of time), reading each
file's head and tail (`integrity.inspect_file`) in one process per CPU core this process may use
(`parallel`). One process builds, under an exclusive lock on the index file's .lock; the others wait
on the lock and then read what it wrote.

Stale. An index remembers the modification time of the split folder and of every folder holding
its images (a list file: the list itself and the folders of the files it lists). Adding, removing
or renaming a file changes its folder's time, so a start-up check costs one stat per folder
(~1,000), not one per file; an index found stale is rebuilt, with a line saying why. A file
rewritten in place with a new size leaves its folder's time alone: the loaders compare the bytes
they read with the size the index holds and stop with a DataError naming the file. (Folder times
have the file system's resolution: a change in the same few ms as the index was built can be missed.)

`load_samples` is what the loaders call: the class names and both splits' samples, from the index.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..files import atomic_write
from .integrity import BadImage, inspect_file
from .parallel import map_chunks, usable_cpus
from .samples import DataError, Samples, class_folders, read_list, scan_folder, scan_split

VERSION = 1
FOLDER = ".lowrank_index"


def index_folder(root: Path) -> Path:
    """ROOT/.lowrank_index if it can be written there, else a per-root folder in the user's cache."""
    folder = root / FOLDER
    # Another rank may create the folder while this one looks: "not a folder yet" followed by "but it
    # exists now" must still mean ROOT's folder (it once sent this rank to the user cache, to build a
    # second index). A file of that name is not a folder: the user cache then.
    if folder.is_dir():
        writable = os.access(folder, os.W_OK)
    else:
        writable = os.access(root, os.W_OK) and (not folder.exists() or folder.is_dir())
    if writable:
        return folder
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lowrank_dist" / "index" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]


def index_path(root: Path, split: str, list_file: Path | None) -> Path:
    if list_file is None:
        return index_folder(root) / f"{split}.npz"
    digest = hashlib.sha1(str(Path(list_file).resolve()).encode()).hexdigest()[:12]
    return index_folder(root) / f"list-{Path(list_file).stem}-{digest}.npz"


# -- what the index must match ---------------------------------------------------------------------


def _mtime(path: Path | str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return -1  # gone: differs from any time recorded


def fingerprint(root: Path, split: str, list_file: Path | None, folders: list[str] | None = None) -> dict:
    """What a change to the split would change, one stat per folder. `folders` (relative to root):
    those holding the listed images, for a list file; for a folder split they are its subfolders."""
    if list_file is None:
        split_dir = root / split
        listing = scan_folder(split_dir)
        listing.check_readable()
        folders = [f"{split}/{name}" for name in listing.folders]
        return {"split": _mtime(split_dir), "folders": {f: _mtime(root / f) for f in folders}}
    stat = os.stat(list_file)
    return {"list": [stat.st_size, stat.st_mtime_ns], "folders": {f: _mtime(root / f) for f in folders or []}}


def stale_because(meta: dict, root: Path, split: str, list_file: Path | None, classes: list[str] | None) -> str | None:
    """Why an index no longer describes the split, or None if it still does."""
    if meta.get("version") != VERSION:
        return f"written by index format {meta.get('version')}, this is {VERSION}"
    if classes is not None and meta["classes"] != classes:
        return "the train class folders changed (labels would shift)"
    try:
        now = fingerprint(root, split, list_file, list(meta["fingerprint"]["folders"]))
    except OSError as error:
        return f"cannot stat the split: {error}"
    then = meta["fingerprint"]
    if now.get("list") != then.get("list") or now.get("split") != then.get("split"):
        return f"{list_file or root / split} changed"
    changed = [f for f in set(now["folders"]) | set(then["folders"]) if now["folders"].get(f) != then["folders"].get(f)]
    if changed:
        return f"folder {str(root / sorted(changed)[0])!r} changed" + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
    return None


# -- building --------------------------------------------------------------------------------------


def _inspect_chunk(paths: list[str]) -> list[tuple[int, int, int, str | None]]:
    """(size, width, height, why it is bad or None) per file."""
    out = []
    for path in paths:
        try:
            size, info = inspect_file(path)
            out.append((size, info.width, info.height, None))
        except BadImage as bad:
            out.append((0, 0, 0, str(bad)))
        except OSError as error:
            out.append((0, 0, 0, f"cannot be read: {error.strerror or error}"))
    return out


def build(root: Path, split: str, list_file: Path | None, classes: list[str] | None, num_classes: int | None,
          jobs: int) -> tuple[Samples, dict]:
    """List the split (raising DataError on layout problems, as samples does) and inspect every image."""
    if list_file is None:
        class_folders(root / split)  # a missing or empty split is a DataError naming it
        before = fingerprint(root, split, None)  # taken before listing: a change while we list shows next time
        listed = scan_split(root / split, {name: i for i, name in enumerate(classes)})
    else:
        listed = read_list(root, list_file, num_classes)
        prefix = str(root) + os.sep
        folders = sorted({os.path.dirname(p[len(prefix):] if p.startswith(prefix) else p) for p in listed.paths})
        before = fingerprint(root, split, list_file, folders)
    entries = map_chunks(_inspect_chunk, listed.paths, jobs)
    sizes, widths, heights, why = zip(*entries) if entries else ((), (), (), ())
    samples = Samples(listed.paths, listed.labels, sizes=np.asarray(sizes, dtype=np.int64),
                      widths=np.asarray(widths, dtype=np.int64), heights=np.asarray(heights, dtype=np.int64),
                      bad={i: w for i, w in enumerate(why) if w is not None})
    return samples, {"version": VERSION, "classes": classes, "fingerprint": before}


def _blob(strings: list[str]) -> np.ndarray:
    # surrogateescape: a file name that is not UTF-8 is kept as its bytes (as os.fsencode does)
    return np.frombuffer("\0".join(strings).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _strings(blob: np.ndarray) -> list[str]:
    return blob.tobytes().decode("utf-8", "surrogateescape").split("\0") if len(blob) else []


def save(path: Path, root: Path, samples: Samples, meta: dict) -> None:
    prefix = str(root) + os.sep
    relative = [p[len(prefix):] if p.startswith(prefix) else p for p in samples.paths]
    bad = sorted(samples.bad)
    with atomic_write(path) as f:  # a file object: np.savez would add .npz to a name
        np.savez(f, meta=_blob([json.dumps(meta)]), paths=_blob(relative), labels=samples.labels,
                 sizes=samples.sizes, widths=samples.widths, heights=samples.heights,
                 bad_index=np.asarray(bad, dtype=np.int64), bad_why=_blob([samples.bad[i] for i in bad]))


def load(path: Path, root: Path, warn: bool = True) -> tuple[Samples, dict] | None:
    """The index at `path`, or None if there is none or it is damaged (it is then rebuilt; a damaged
    one with a warning saying what is wrong with it)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            prefix = str(root) + os.sep
            paths = [p if p.startswith(os.sep) else prefix + p for p in _strings(data["paths"])]
            bad = dict(zip(data["bad_index"].tolist(), _strings(data["bad_why"])))
            samples = Samples(paths, data["labels"], sizes=data["sizes"], widths=data["widths"],
                              heights=data["heights"], bad=bad)
        problem = _damage(samples, meta)
    except Exception as error:  # noqa: BLE001 - truncated, empty, not a zip, not ours: all rebuilt
        problem = (str(error).splitlines() or [type(error).__name__])[0][:200]
    if problem is not None:
        if warn:
            print(f"warning: the data index {path} is damaged ({problem}); rebuilding it", file=sys.stderr, flush=True)
        return None
    return samples, meta


def _damage(samples: Samples, meta) -> str | None:
    """What is wrong with a loaded index (what `build` and `save` would never write), or None."""
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), dict):
        return "no fingerprint"
    if not isinstance(meta["fingerprint"].get("folders"), dict):
        return "no folder times"
    count = len(samples.paths)
    for name in ("labels", "sizes", "widths", "heights"):
        array = getattr(samples, name)
        if array.dtype != np.int64 or array.shape != (count,) or (count and array.min() < 0):
            return f"{name} is not {count} counts"
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or (count and samples.labels.max() >= len(classes))):
        return "labels out of range of its classes"
    if any(not isinstance(i, int) or not 0 <= i < count for i in samples.bad):
        return "bad images out of range"
    return None


@contextmanager
def _locked(path: Path):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")
    except OSError:  # nowhere to write: build without the lock (and save says it could not save)
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to build the data index {path}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def split_samples(root: Path, split: str, *, classes: list[str] | None, list_file: Path | None = None,
                  num_classes: int | None = None, jobs: int | None = None, rebuild: bool = False,
                  quiet: bool = False) -> Samples:
    """The split's samples from its index, building or rebuilding the index first if it is missing
    or stale. `classes`: the train class names (folder splits, to number the labels)."""
    root = Path(root)
    path = index_path(root, split, list_file)
    found = None if rebuild else load(path, root)
    if found is not None and stale_because(found[1], root, split, list_file, classes) is None:
        return found[0]
    with _locked(path):
        found = None if rebuild else load(path, root, warn=found is not None)  # built by another while we waited?
        why = None if found is None else stale_because(found[1], root, split, list_file, classes)
        if found is not None and why is None:
            return found[0]
        started = time.perf_counter()
        samples, meta = build(root, split, list_file, classes, num_classes, jobs or usable_cpus())
        try:
            save(path, root, samples, meta)
        except OSError as error:  # the index only saves time: this run goes on with what it just built
            print(f"warning: could not save the data index {path} ({error.strerror or error}); the next run builds it"
                  " again", file=sys.stderr, flush=True)
        if not quiet:
            print(f"data index {path}: {len(samples)} images, {len(samples.bad)} bad,"
                  f" built in {time.perf_counter() - started:.1f} s" + (f" ({why}: rebuilt)" if why else ""), flush=True)
        return samples


def load_samples(
    root: str | os.PathLike, train_list: str | os.PathLike | None = None, val_list: str | os.PathLike | None = None,
    with_train: bool = True, jobs: int | None = None, rebuild: bool = False,
) -> tuple[list[str], Samples | None, Samples]:
    """(class names, train samples, val samples), from the data index (built or rebuilt first if it
    is missing or stale). With a train list the classes are named "0".."K-1", K = its largest
    label + 1, since a list carries numbers, not folder names. `with_train=False` (evaluation) finds
    the classes without listing, checking or indexing the train images: train is None."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {str(root)!r} does not exist")
    train = None
    if train_list is not None:
        train_list = Path(train_list)
        if with_train:
            if not train_list.is_file():
                raise DataError(f"list file {str(train_list)!r} does not exist")
            train = split_samples(root, "train", classes=None, list_file=train_list, jobs=jobs, rebuild=rebuild)
        else:
            train = read_list(root, train_list, None, check_files=False)
        classes = [str(label) for label in range(int(train.labels.max()) + 1)]
    else:
        classes = class_folders(root / "train")
        if with_train:
            train = split_samples(root, "train", classes=classes, jobs=jobs, rebuild=rebuild)
    if val_list is not None:
        val_list = Path(val_list)
        if not val_list.is_file():
            raise DataError(f"list file {str(val_list)!r} does not exist")
        val = split_samples(root, "val", classes=classes, list_file=val_list, num_classes=len(classes), jobs=jobs,
                            rebuild=rebuild)
    else:
        class_folders(root / "val")  # a missing val folder is named as such
        val = split_samples(root, "val", classes=classes, jobs=jobs, rebuild=rebuild)
    return classes, train if with_train else None, val


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lowrank_dist.data.index", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="data set folder holding train/<class>/*.JPEG and val/<class>/*.JPEG")
    parser.add_argument("--train-list", type=Path, metavar="FILE", help="the train split as a list file (data.train_list)")
    parser.add_argument("--val-list", type=Path, metavar="FILE", help="the val split as a list file (data.val_list)")
    parser.add_argument("--jobs", type=int, default=usable_cpus(), help="processes (default: the CPU cores this process may use)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if the index is up to date")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        classes, train, val = load_samples(args.root, args.train_list, args.val_list, jobs=args.jobs, rebuild=args.rebuild)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, samples, list_file in (("train", train, args.train_list), ("val", val, args.val_list)):
        line = f"{name}: {len(samples)} images, {len(samples.bad)} bad"
        if samples.bad:
            line += f" (python -m lowrank_dist.data.check {args.root} says why)"
        print(f"{line}; index {index_path(args.root, name, list_file)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
