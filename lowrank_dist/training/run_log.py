"""What a run reports as it goes: TensorBoard, metrics.jsonl and the console."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


def _quiet_tensorboard_thread(args) -> None:
    """TensorBoard writes its events on a thread of its own; a write error there (a full disk) would
    print that thread's traceback. RunLog gets the same error from the writer at its next call and
    drops TensorBoard with one warning, so the thread's own report is left out; anything else is
    reported as Python would."""
    if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
        return
    _python_hook(args)


_python_hook = threading.excepthook


class RunLog:
    """TensorBoard, a metrics.jsonl file and the console; silent except on the main rank.

    Logs are worth less than the training they describe: a write that fails (a full disk, a
    vanished network folder) is reported once, that sink is dropped and the run goes on. The
    checkpoints are what must not be lost, and a checkpoint that cannot be written stops the run."""

    def __init__(self, folder: Path, enabled: bool):
        """Raises OSError where the logs cannot be created (the run then stops before it starts)."""
        self.enabled = enabled
        self.writer = self.metrics = None
        if enabled:
            threading.excepthook = _quiet_tensorboard_thread
            self.metrics = open(folder / "metrics.jsonl", "a")
            try:
                self.writer = SummaryWriter(str(folder / "tensorboard"))
            except BaseException:
                self.metrics.close()
                raise

    def drop(self, sink: str, error: OSError) -> None:
        """Stop writing `sink` ("tensorboard" or "metrics") after `error`, saying so once."""
        print(f"warning: could not write {sink} ({error}); the run goes on without it", file=sys.stderr)
        stream = self.writer if sink == "tensorboard" else self.metrics
        if sink == "tensorboard":
            self.writer = None
        else:
            self.metrics = None
        try:  # what it still buffers cannot be written either; closed now, not by the garbage collector's warning
            stream.close()
        except OSError:
            pass

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            try:
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, step)
            except OSError as error:
                self.drop("tensorboard", error)
        if self.metrics is not None:
            try:
                self.metrics.write(json.dumps({"step": step, **values}) + "\n")
                self.metrics.flush()
            except OSError as error:
                self.drop("metrics", error)

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            try:
                self.writer.add_text(tag, text)
            except OSError as error:
                self.drop("tensorboard", error)

    def print(self, message: str) -> None:
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        for sink, stream in (("tensorboard", self.writer), ("metrics", self.metrics)):
            if stream is not None:
                try:
                    stream.close()
                except OSError as error:
                    self.drop(sink, error)
