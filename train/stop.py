"""How a run stops: its exceptions (each one line and an exit status in the entries' main) and the
stop request that SIGINT / SIGTERM set, which the training loop polls at step boundaries."""

from __future__ import annotations

import signal
import sys


class UsageError(Exception):
    """Bad input or settings: main() prints the message as one line and exits with status 2."""


class NonFiniteLoss(RuntimeError):
    """A training loss became NaN or infinite: one line, exit status 2, last good checkpoint kept."""


class JobsFailed(Exception):
    """Some jobs of a grid did not finish (the others' results are kept): one line, exit status 1."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a step boundary: one line, exit 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# ----------------------------------------------------------------------------- stop requests


class StopRequest:
    """Set by the SIGINT / SIGTERM handler; the training loop, the evaluation and the analysis poll
    it between batches, so a checkpoint or an output file being written is never cut in half. A
    second Ctrl-C (SIGINT) while a stop is pending raises KeyboardInterrupt at once (for a user who
    really wants out now). Any other second signal only repeats the request: Slurm sends SIGTERM
    at a time limit whose USR2 came first, and the job must still save its checkpoint and exit."""

    def __init__(self):
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def handler(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            print(
                f"\n{signal.Signals(signum).name} received while stopping: still stopping after the current step",
                file=sys.stderr,
                flush=True,
            )
            return
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name} received: stopping after the current step (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


STOP = StopRequest()
# the signals that request a stop; a job under submitit adds SIGUSR2 (its time limit is near)
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM]


def check_stop(where: str) -> None:
    """Raise Interrupted if a stop was requested; `where` says what was being done."""
    if STOP:
        raise Interrupted(f"{STOP.name} during {where}", STOP.signum)
