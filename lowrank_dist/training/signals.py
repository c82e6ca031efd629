"""Stop requests: the signals that ask a run to checkpoint and stop."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """Turns SLURM's warnings into a clean stop: USR2 (sbatch --signal=USR2@T, before the time limit
    or preemption) and TERM (preemption, `scontrol requeue`, `scancel`; SIGKILL follows after
    KillWait, 30 s by default) set `event`; at its next stop check (`run.stop_check_every` steps
    at most) the trainer checkpoints that step on every rank and raises Preempted. `received` is the last signal caught."""

    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.event = threading.Event()
        self.received: int | None = None
        self.previous = {sig: signal.signal(sig, self._catch) for sig in signals}

    def _catch(self, signum, frame) -> None:
        self.received = signum
        self.event.set()
