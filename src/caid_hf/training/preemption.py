"""Stop cleanly when the cluster asks: SIGTERM (Slurm, Kubernetes) and SIGINT (Ctrl-C).

The first signal only sets a flag; the training loop finishes its current optimizer step,
saves a checkpoint and raises :class:`TrainingPreempted`, whose exit status
(:data:`PREEMPTED_EXIT_CODE`) tells a job script to resubmit the same command, which then
resumes (``--resume_from_checkpoint latest``). A second SIGINT interrupts at once, as usual.
"""

from __future__ import annotations

import os
import signal
import threading

from .. import _startup

# EX_TEMPFAIL of sysexits.h: "temporary failure, the user is invited to retry"
PREEMPTED_EXIT_CODE = _startup.PREEMPTED_EXIT_CODE


class TrainingPreempted(SystemExit):
    """Raised after a signal once the run's state is saved; exits with status 75."""

    def __init__(self, global_step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.global_step = global_step


_INSTALLED: list[PreemptionHandler] = []


def _restore_in_child() -> None:
    """A forked child (DataLoader or prepare-data worker) must die on SIGTERM as usual: a
    pool that terminates its workers would otherwise wait for them forever."""
    for handler in list(_INSTALLED):
        handler.restore()
    _startup.default_in_child()  # nor by the start-up handler those restored


os.register_at_fork(after_in_child=_restore_in_child)


class PreemptionHandler:
    """Records SIGTERM / SIGINT instead of dying, while it is installed.

    Installed on creation when running in the main thread (signal handlers can only be set
    there); ``restore()`` (or leaving the ``with`` block) puts the previous handlers back.
    Forked children start with the previous handlers.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _INSTALLED.append(self)

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # impatient second Ctrl-C
            self.restore()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def restore(self) -> None:
        try:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
        except ValueError:  # not the main thread: nothing was installed from it either
            pass
        self._previous = {}
        if self in _INSTALLED:
            _INSTALLED.remove(self)
