"""Stop requests: the signals that ask a run to checkpoint and stop."""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Turns SLURM's warnings and Ctrl-C into a clean stop: USR2 (sbatch --signal=USR2@T, before the
    time limit or preemption), TERM (preemption, `scontrol requeue`, `scancel`; SIGKILL follows after
    KillWait, 30 s by default) and INT (Ctrl-C) set `event`; at its next stop check
    (`run.stop_check_every` steps at most) the trainer checkpoints that step on every rank and raises
    Preempted. `received` is the last signal caught. A Ctrl-C again only repeats the request (under
    torchrun the launcher passes its own Ctrl-C on to every rank, after the terminal did): SIGKILL,
    or Ctrl-\\ (QUIT), stops at once, losing the steps since the last checkpoint.

    Install it first thing, before the imports and the set-up that take seconds: a signal that
    arrives before it ends the process the default way (exit 130 or 143), with no checkpoint."""

    def __init__(self, signals=STOP_SIGNALS):
        self.event = threading.Event()
        self.received: int | None = None
        self.announce = True  # say on stdout that the request was heard (the command leaves it to rank 0)
        self.previous = {sig: signal.signal(sig, self._catch) for sig in signals}

    def _catch(self, signum, frame) -> None:
        first = not self.event.is_set()
        self.received = signum
        self.event.set()
        if first and self.announce:  # os.write: print() may be inside a write of its own stream here
            os.write(1, f"\nstop requested ({signal.Signals(signum).name}): checkpointing at the next stop check"
                        " (run.stop_check_every steps at most), then exit 3\n".encode())

    def restore(self) -> None:
        """The handlers there were before."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
