"""The first thing a caid-hf command does: make SIGTERM during start-up exit with status 75.

Importing torch and transformers takes seconds. A cluster that preempts a job in that
window sends SIGTERM before the training loop's handler (:mod:`.training.preemption`) is
installed, and the process died with -15, which a job script's ``[ $? -eq 75 ] &&
requeue`` does not resubmit. Nothing has been written yet at that point, so the handler
installed here simply exits with the same status 75. It is installed only when the
process runs a caid-hf command (the ``caid-hf`` console script or the repository's
``pretrain.py`` / ``finetune.py``), never when caid-hf is imported as a library. Standard
library only: it runs before any heavy import.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PREEMPTED_EXIT_CODE = 75  # the same as training.preemption's (which imports torch)
COMMAND_NAMES = ("caid-hf", "pretrain.py", "finetune.py")


def _exit_preempted(signum, frame) -> None:
    os._exit(PREEMPTED_EXIT_CODE)


def default_in_child() -> None:
    """In a forked worker: SIGTERM kills it as usual."""
    if signal.getsignal(signal.SIGTERM) is _exit_preempted:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def running_a_command(argv: list[str] | None = None) -> bool:
    """Whether this process was started as a caid-hf command (by its program name)."""
    argv = sys.argv if argv is None else argv
    return bool(argv) and os.path.basename(argv[0]) in COMMAND_NAMES


def install_startup_handler(argv: list[str] | None = None) -> bool:
    """Install the start-up SIGTERM handler when running a command from the main thread;
    returns whether it was installed."""
    if not running_a_command(argv) or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, _exit_preempted)
        return True
    return False


os.register_at_fork(after_in_child=default_in_child)
