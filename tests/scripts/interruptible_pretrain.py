"""Run by tests/test_resilience.py: the real entry point, killed on request.

``CAID_SIGKILL_AT_STEP=k`` SIGKILLs this process in the middle of optimizer step k (after
its backward, before the update); ``CAID_SIGKILL_IN_SAVE=k`` SIGKILLs it while checkpoint_k
is being written (files on disk, no marker yet); ``CAID_SIGTERM_AT_STEP=k`` sends SIGTERM
during step k, as a cluster's preemption would.
"""

import os
import signal
import sys

import caid_hf.training.checkpointing as checkpointing
import caid_hf.training.pretrain as pretrain

kill_at = int(os.environ.get("CAID_SIGKILL_AT_STEP", "0"))
kill_in_save = int(os.environ.get("CAID_SIGKILL_IN_SAVE", "0"))
term_at = int(os.environ.get("CAID_SIGTERM_AT_STEP", "0"))
steps = {"n": 0}
_step_flags = pretrain.step_flags


def step_flags(model, loss, accelerator, stop_requested):
    steps["n"] += 1
    step = pretrain_step() + 1
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    if step == term_at:
        os.kill(os.getpid(), signal.SIGTERM)
        stop_requested = True  # the handler ran; make sure this very step sees it
    return _step_flags(model, loss, accelerator, stop_requested)


def pretrain_step() -> int:
    """Optimizer steps done before this run started plus the ones it took."""
    return start_step + steps["n"] - 1


_fsync_tree = checkpointing._fsync_tree


def fsync_tree(folder):
    if kill_in_save and folder.name == f".tmp-checkpoint_{kill_in_save}":
        os.kill(os.getpid(), signal.SIGKILL)
    return _fsync_tree(folder)


_load = checkpointing.load_checkpoint
start_step = 0


def load_checkpoint(accelerator, path, state, scheduler, augmenter):
    global start_step
    _load(accelerator, path, state, scheduler, augmenter)
    start_step = state.global_step


pretrain.step_flags = step_flags
pretrain.load_checkpoint = load_checkpoint
checkpointing._fsync_tree = fsync_tree
pretrain.main(sys.argv[1:])
