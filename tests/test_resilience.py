"""Training that survives: exact resume after kills, atomic checkpoints, preemption, non-finite
steps, configuration errors before compute, and loading that never unpickles objects."""

import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from caid_hf import CAiDConfig, CAiDForPreTraining, CAiDModel, runs
from caid_hf.training import checkpointing
from caid_hf.training.checkpointing import (
    MARKER,
    CheckpointSaveError,
    latest_checkpoint,
)
from caid_hf.training.preemption import PREEMPTED_EXIT_CODE
from caid_hf.training.pretrain import main

from helpers import ROOT, TINY, assert_identical_runs, final_state

SCRIPT = ROOT / "tests" / "scripts" / "interruptible_pretrain.py"
# 4 steps per epoch: 10 steps cross two epoch ends (validation, best/, epoch checkpoints)
# channels_last pinned: with it unset, each fresh run's start-up measurement may pick the
# other memory format on a busy machine (different rounding), and these tests compare two
# fresh runs; keeping a measured choice across a resume has its own test below
RUN = TINY + ["--max_steps", "10", "--save_steps", "2", "--save_total_limit", "2",
              "--full_determinism", "true", "--resume_from_checkpoint", "latest",
              "--channels_last", "true"]


def _run(out: Path, **kill) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           **{f"CAID_{k.upper()}": str(v) for k, v in kill.items()}}
    return subprocess.run([sys.executable, str(SCRIPT), *RUN, "--output_dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """One uninterrupted run of RUN, the reference every interrupted run must equal."""
    reference = tmp_path_factory.mktemp("uninterrupted")
    done = _run(reference)
    assert done.returncode == 0, done.stderr[-3000:]
    return reference


@pytest.mark.slow
def test_sigkill_at_random_instants_then_same_command_gives_identical_weights(tmp_path,
                                                                              uninterrupted):

    rng = random.Random(2026)
    kill_steps = sorted(rng.sample(range(2, 10), 2))  # mid-step kills
    save_kill = rng.choice([4, 6, 8])  # a kill while checkpoint_N is written
    plan = [{"sigkill_at_step": kill_steps[0]}, {"sigkill_in_save": save_kill},
            {"sigkill_at_step": kill_steps[1]}]
    plan.sort(key=lambda k: next(iter(k.values())))
    out = tmp_path / "killed"
    for kill in plan:
        proc = _run(out, **kill)
        assert proc.returncode == -9, (kill, proc.stderr[-3000:])
    # the save that was killed left a marker-less temporary folder, never a checkpoint_N
    assert all((p / MARKER).is_file() for p in (out / "checkpoints").glob("checkpoint_*"))
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert_identical_runs(uninterrupted, out)
    # retention: the newest 2 plus the best validation checkpoint
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*"))
    assert "checkpoint_10" in kept and len(kept) <= 3


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_exits_75_and_resumes_identically(tmp_path, uninterrupted):
    out = tmp_path / "preempted"
    proc = _run(out, sigterm_at_step=7)  # mid-epoch: step 3 of the second epoch
    assert proc.returncode == PREEMPTED_EXIT_CODE, proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 7" in proc.stdout
    assert (out / "checkpoints" / "checkpoint_7" / MARKER).is_file()
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 7" in proc.stdout
    assert_identical_runs(uninterrupted, out)


def test_latest_skips_a_checkpoint_without_marker(tmp_path):
    good = tmp_path / "checkpoints" / "checkpoint_4"
    good.mkdir(parents=True)
    (good / MARKER).write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint_6").mkdir()  # interrupted: no marker
    (tmp_path / "checkpoints" / ".tmp-checkpoint_8").mkdir()
    with pytest.warns(UserWarning, match="checkpoint_6: it has no COMPLETE marker"):
        assert latest_checkpoint(tmp_path) == good


def test_resuming_an_unfinished_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "checkpoints" / "checkpoint_2"
    folder.mkdir(parents=True)
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "3",
                     "--resume_from_checkpoint", str(folder)])


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, path, *args, **kwargs):
        if Path(path).parent.name == ".tmp-checkpoint_2":
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", failing_save)
    with pytest.raises(CheckpointSaveError,
                       match=r"checkpoint_2 failed \(no space left on the device\); the last "
                             r"good checkpoint .*checkpoint_1 is kept"):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "3", "--save_steps", "1"])
    assert calls["n"] >= 1
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint_1"] and (tmp_path / "checkpoints" / "checkpoint_1" / MARKER).is_file()
    assert latest_checkpoint(tmp_path).name == "checkpoint_1"


def _nan_at(monkeypatch, steps):
    """Make the loss NaN at the given optimizer steps (1-based; every step when None)."""
    real_forward = CAiDForPreTraining.forward
    count = {"n": 0}

    def forward(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        if self.training:
            count["n"] += 1
            if steps is None or count["n"] in steps:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CAiDForPreTraining, "forward", forward)


def test_a_nan_loss_skips_that_update_only(tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, {2})
    result = main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "3"])
    assert result.global_step == 3
    assert "step 2: non-finite loss or gradient, update skipped (1 skipped so far)" in \
        capsys.readouterr().out
    logged = [h["train/nonfinite_steps"] for h in result.history if "train/loss" in h]
    assert logged == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_nan_at_every_step_stops_after_the_limit(tmp_path, monkeypatch):
    _nan_at(monkeypatch, None)
    with pytest.raises(FloatingPointError, match=r"stopped at step 3: .* 3 consecutive steps "
                                                 r"\(steps 1-3\); the last good checkpoint is none"):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "8",
                     "--max_consecutive_nonfinite_steps", "3"])


@pytest.mark.parametrize("flags, message", [
    (["--queue_size", "60"], "queue_size=60 must be divisible by the global batch"),
    (["--image_size", "100"], "image_size must be a positive multiple of 32"),
    (["--per_device_train_batch_size", "1"], "per_device_train_batch_size=1"),
    (["--shuffle_bn_splits", "3"], "shuffle_bn_splits=3"),
])
def test_config_errors_stop_before_any_model_is_built(tmp_path, monkeypatch, flags, message):
    built = []
    monkeypatch.setattr("caid_hf.training.pretrain.CAiDForPreTraining.__init__",
                        lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=message):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "1", *flags])
    assert not built


def test_unknown_yaml_key_stops_with_a_suggestion(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("encoder_name: resnet18\nqueue_sise: 64\n")
    with pytest.raises(ValueError, match="unknown key 'queue_sise'; did you mean 'queue_size'"):
        main(["--config", str(config), "--output_dir", str(tmp_path / "out")])


class _Payload:
    """Unpickling this would run code: torch.load(weights_only=True) must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_resume_refuses_pickled_objects(tmp_path):
    out = tmp_path / "run"
    main(TINY + ["--output_dir", str(out), "--max_steps", "1"])
    checkpoint = latest_checkpoint(out)
    torch.save({"payload": _Payload()}, checkpoint / "scheduler.pt")
    with pytest.raises(ValueError, match="scheduler.pt holds pickled Python objects"):
        main(TINY + ["--output_dir", str(out), "--max_steps", "2",
                     "--resume_from_checkpoint", "latest"])


def test_from_pretrained_never_unpickles_objects(tmp_path):
    model = CAiDModel(CAiDConfig(encoder_name="resnet18", encoder_weights=None, image_size=64))
    model.config.save_pretrained(tmp_path)
    torch.save({"payload": _Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|pickle|global"):
        CAiDModel.from_pretrained(tmp_path)


def test_signal_handlers_are_restored_even_when_the_run_fails(tmp_path, monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    _nan_at(monkeypatch, None)
    with pytest.raises(FloatingPointError):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "4",
                     "--max_consecutive_nonfinite_steps", "1"])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def _wait_then_sleep(started) -> None:
    import time

    started.set()
    time.sleep(60)


def test_forked_children_die_on_sigterm_while_the_handler_is_installed():
    import multiprocessing
    import signal

    from caid_hf.training.preemption import PreemptionHandler

    # the child gets the handler that was there before: make that the default one (other
    # code in this test process may have set its own)
    outer = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with PreemptionHandler() as handler:
            context = multiprocessing.get_context("fork")
            started = context.Event()
            child = context.Process(target=_wait_then_sleep, args=(started,))
            child.start()
            assert started.wait(timeout=20)
            child.terminate()  # SIGTERM: a pool's terminate() must not hang on the worker
            child.join(timeout=20)
            if child.exitcode is None:
                child.kill()
                child.join()
                pytest.fail("the forked child ignored SIGTERM")
            assert child.exitcode == -signal.SIGTERM
            assert not handler.requested
    finally:
        signal.signal(signal.SIGTERM, outer)


def _two_checkpoints(tmp_path, steps=6) -> tuple[Path, list]:
    """A run saving every 3 steps and at each epoch end (4 steps): for 6 steps, checkpoints
    3, 4 and 6 (plus final/)."""
    out = tmp_path / "run"
    main(TINY + ["--output_dir", str(out), "--max_steps", str(steps), "--save_steps", "3",
                 "--save_total_limit", "0", "--full_determinism", "true"])
    return out, checkpointing.list_checkpoints(out)


def _resume(out, to_step=8, where="latest"):
    return main(TINY + ["--output_dir", str(out), "--max_steps", str(to_step),
                        "--save_steps", "3", "--save_total_limit", "0",
                        "--full_determinism", "true",
                        "--resume_from_checkpoint", str(where)])


@pytest.mark.parametrize("damage", ["missing", "pickled object", "truncated"])
def test_resume_with_a_damaged_rng_file_refuses_naming_it(tmp_path, damage):
    out, checkpoints = _two_checkpoints(tmp_path)
    rng = checkpoints[-1] / "random_states_0.pkl"
    if damage == "missing":
        rng.unlink()
    elif damage == "pickled object":
        torch.save({"payload": _Payload()}, rng)
    else:
        rng.write_bytes(rng.read_bytes()[:100])
    with pytest.raises(checkpointing.CheckpointDamagedError,
                       match=r"checkpoint_6/random_states_0\.pkl is (missing|unreadable)"):
        _resume(out, where=checkpoints[-1])
    assert not (out / "checkpoints" / "checkpoint_8").exists()


@pytest.mark.slow
def test_latest_falls_back_past_a_damaged_checkpoint_and_says_so(tmp_path, capsys):
    out, checkpoints = _two_checkpoints(tmp_path, steps=8)  # checkpoints 3, 4, 6, 8
    solo = load_file(out / "final" / "model.safetensors")
    for folder in checkpoints[-2:]:
        (folder / "random_states_0.pkl").unlink()
    capsys.readouterr()
    result = _resume(out)
    said = capsys.readouterr().out
    assert "random_states_0.pkl is missing" in said and "skipping checkpoint_8" in said
    assert "resuming from checkpoint_4, the newest undamaged" in said
    assert result.global_step == 8
    resumed = load_file(out / "final" / "model.safetensors")  # steps 5-8 again, the same
    assert resumed.keys() == solo.keys() and all(torch.equal(resumed[k], solo[k]) for k in solo)


def test_latest_with_every_checkpoint_damaged_refuses_instead_of_restarting(tmp_path):
    out, checkpoints = _two_checkpoints(tmp_path)
    for folder in checkpoints:
        (folder / "random_states_0.pkl").unlink()
    with pytest.raises(checkpointing.CheckpointDamagedError, match="checkpoint_6/random_states"):
        _resume(out)


@pytest.mark.parametrize("name, damage, reason", [
    ("optimizer.bin", b"\x80\x02not a torch file", "optimizer.bin is unreadable"),
    ("model.safetensors", None, r"model\.safetensors is unreadable"),
])
def test_resume_names_an_unreadable_optimizer_or_weights_file(tmp_path, name, damage, reason):
    out, checkpoints = _two_checkpoints(tmp_path)
    path = checkpoints[-1] / name
    before = load_file(checkpoints[0] / "model.safetensors")
    path.write_bytes(damage if damage is not None else path.read_bytes()[:1000])
    with pytest.raises(checkpointing.CheckpointDamagedError, match=reason):
        _resume(out, where=checkpoints[-1])
    # checked before loading anything: the earlier checkpoint still resumes
    result = _resume(out, to_step=4, where=checkpoints[0])
    assert result.global_step == 4 and before.keys() == load_file(
        checkpoints[0] / "model.safetensors").keys()


def _timings_favouring(channels_last: bool, timed: list):
    """A stand-in for the calibration's timing: the arms of ``channels_last`` take half the
    time of the others (and the call is counted in ``timed``)."""
    def time_step_settings(make_step, candidates, rounds=2, **kwargs):
        timed.append(channels_last)
        return {c: [0.5 if c.channels_last == channels_last else 1.0] for c in candidates}

    return time_step_settings


def _checkpoint_tensors(out: Path, step: int) -> dict:
    weights, optimizer = final_state(out, step)
    return {**weights, **{f"optimizer.{index}.{name}": torch.as_tensor(value)
                          for index, slots in optimizer["state"].items()
                          for name, value in slots.items()}}


@pytest.mark.slow
def test_a_resumed_run_keeps_the_step_settings_it_started_with(tmp_path, monkeypatch, capsys):
    """Started when contiguous tensors measured faster, resumed (from step 3) when
    channels_last would win a new measurement: the checkpoint's record decides, nothing is
    timed, and steps 4-6 equal the uninterrupted run's bit for bit. Resuming in
    channels_last instead gives other numbers, so the comparison can fail."""
    from caid_hf import performance

    timed = []
    monkeypatch.setenv(performance.CACHE_VARIABLE, str(tmp_path / "cache-at-start"))
    monkeypatch.setattr(performance, "time_step_settings", _timings_favouring(False, timed))
    out, checkpoints = _two_checkpoints(tmp_path)  # checkpoints 3, 4 and 6
    assert timed == [False] and checkpoints[0].name == "checkpoint_3"
    uninterrupted = _checkpoint_tensors(out, 6)
    # a new start would now measure channels_last faster (an empty cache, other timings)
    monkeypatch.setenv(performance.CACHE_VARIABLE, str(tmp_path / "cache-at-resume"))
    monkeypatch.setattr(performance, "time_step_settings", _timings_favouring(True, timed))
    capsys.readouterr()
    result = _resume(out, to_step=6, where=checkpoints[0])
    said = capsys.readouterr().out
    assert timed == [False] and result.global_step == 6
    assert ("step settings: fp32, contiguous (the choice this run started with, kept on "
            "resuming)") in said
    assert result.model.caid.encoder.conv1.weight.is_contiguous()
    resumed = _checkpoint_tensors(out, 6)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    # the same resume told to use channels_last ends elsewhere
    main(TINY + ["--output_dir", str(out), "--max_steps", "6", "--save_steps", "3",
                 "--save_total_limit", "0", "--full_determinism", "true",
                 "--resume_from_checkpoint", str(checkpoints[0]), "--channels_last", "true"])
    assert timed == [False]
    other = _checkpoint_tensors(out, 6)
    assert any(not torch.equal(other[key], value) for key, value in uninterrupted.items())


def test_a_run_started_on_another_kind_of_device_measures_again(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from caid_hf import performance
    from caid_hf.configuration_caid import CAiDConfig
    from caid_hf.training.arguments import parse_pretraining_args
    from caid_hf.training.pretrain import decide_step_settings

    folder = tmp_path / "checkpoints" / "checkpoint_5"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    record = {"mixed_precision": "bf16", "channels_last": True, "device": "cuda"}
    (folder / checkpointing.STATE_FILE).write_text(
        checkpointing.TrainState(global_step=5, step_settings=record).to_json())
    monkeypatch.setattr(performance, "calibrate_step_settings", lambda candidates, *a, **k:
                        performance.StepSettingsChoice(candidates[-1], "measured"))
    _, data_args, args = parse_pretraining_args(["--resume_from_checkpoint", "latest"])
    processes = SimpleNamespace(device=torch.device("cpu"), is_main_process=True,
                                num_processes=1)
    choice = decide_step_settings(CAiDConfig(), data_args, args, tmp_path, processes)
    assert choice.how == "measured" and args.channels_last is choice.settings.channels_last


@pytest.mark.parametrize("record, expected", [
    ({"mixed_precision": "bf16", "channels_last": False, "device": "cpu"}, "bf16, contiguous"),
    (None, "fp32, channels_last"),  # a checkpoint of an older caid-hf: what 'auto' meant then
])
def test_resume_reads_the_step_settings_before_anything_is_built(tmp_path, monkeypatch, record,
                                                                   expected):
    import json
    from types import SimpleNamespace

    from caid_hf import performance
    from caid_hf.configuration_caid import CAiDConfig
    from caid_hf.training.arguments import parse_pretraining_args
    from caid_hf.training.pretrain import decide_step_settings

    monkeypatch.setattr(performance, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(performance, "calibrate_step_settings",
                        lambda *a, **k: pytest.fail("a resumed run measured"))
    folder = tmp_path / "checkpoints" / "checkpoint_5"
    folder.mkdir(parents=True)
    (folder / MARKER).write_text("{}")
    state = checkpointing.TrainState(global_step=5, step_settings=record)
    (folder / checkpointing.STATE_FILE).write_text(state.to_json())
    assert json.loads(state.to_json())["step_settings"] == record
    _, data_args, args = parse_pretraining_args(["--resume_from_checkpoint", "latest"])
    processes = SimpleNamespace(device=torch.device("cpu"), is_main_process=True,
                                num_processes=1)
    choice = decide_step_settings(CAiDConfig(), data_args, args, tmp_path, processes)
    assert choice.how == "recorded" and choice.settings.label == expected
    assert (args.mixed_precision, args.channels_last) == (choice.settings.mixed_precision,
                                                          choice.settings.channels_last)
    # a flag given at the resume overrides the record; the rest of the record still holds
    # (bf16 although this CPU has no bf16 instructions: the run started on one that had)
    _, data_args, args = parse_pretraining_args(["--resume_from_checkpoint", "latest",
                                                 "--channels_last", "true"])
    choice = decide_step_settings(CAiDConfig(), data_args, args, tmp_path, processes)
    assert choice.how == "recorded" and choice.settings.channels_last is True
    assert choice.settings.mixed_precision == (record or {"mixed_precision": "no"})[
        "mixed_precision"]
    # both given: nothing to decide, nothing read
    _, data_args, args = parse_pretraining_args(["--resume_from_checkpoint", "latest",
                                                 "--channels_last", "false",
                                                 "--mixed_precision", "no"])
    choice = decide_step_settings(CAiDConfig(), data_args, args, tmp_path, processes)
    assert choice.how == "requested" and choice.settings.label == "fp32, contiguous"


def test_atomic_folder_keeps_the_old_folder_on_a_full_disk(tmp_path):
    final = tmp_path / "best"
    with checkpointing.atomic_folder(final) as folder:
        (folder / "config.json").write_text("old")
        (folder / "model.safetensors").write_bytes(b"old weights")
    with pytest.raises(CheckpointSaveError, match=r"best failed \(no space left on the device\); "
                                                  r"the previous .*best is kept"):
        with checkpointing.atomic_folder(final) as folder:
            (folder / "config.json").write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert (final / "config.json").read_text() == "old"
    with checkpointing.atomic_folder(final) as folder:  # a success replaces it whole
        (folder / "config.json").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["config.json"]
    assert (final / "config.json").read_text() == "new"


def test_a_kill_between_the_renames_is_undone_at_the_next_write(tmp_path):
    old = tmp_path / ".old-final"
    old.mkdir()
    (old / "config.json").write_text("previous")
    checkpointing.recover_folder(tmp_path / "final")  # final/ missing: the copy goes back
    assert (tmp_path / "final" / "config.json").read_text() == "previous" and not old.exists()


def test_disk_full_while_writing_best_leaves_no_half_folder(tmp_path, monkeypatch):
    import transformers.modeling_utils

    real = transformers.modeling_utils.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if Path(filename).parent.name == ".tmp-best":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    with pytest.raises(CheckpointSaveError,
                       match=r"best failed \(no space left on the device\); .*best was not written"):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "4"])
    assert not (tmp_path / "best").exists() and not (tmp_path / ".tmp-best").exists()


def test_published_and_checkpoint_files_get_the_umask_mode(tmp_path):
    previous = os.umask(0o022)
    runs._UMASK = None
    try:
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "1"])
    finally:
        os.umask(previous)
        runs._UMASK = None
    for path in [tmp_path / "final" / "model.safetensors", tmp_path / "best" / "model.safetensors",
                 tmp_path / "best" / "README.md",
                 latest_checkpoint(tmp_path) / "model.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o644, path  # safetensors alone writes 0600
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755


def test_sigterm_during_start_up_exits_75_so_job_scripts_requeue(tmp_path):
    import signal
    import time

    command = Path(sys.executable).parent / "caid-hf"
    process = subprocess.Popen([str(command), "pretrain", *TINY, "--output_dir",
                                str(tmp_path / "run"), "--max_steps", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)  # importing torch and transformers: seconds before any training code
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT_CODE, (process.returncode, stderr[-1000:])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_importing_caid_hf_as_a_library_leaves_sigterm_alone():
    code = "import signal, caid_hf; print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "True", result.stderr[-500:]


def test_output_lock_refuses_a_second_holder_naming_the_first(tmp_path):
    import socket

    first = runs.OutputLock(tmp_path).acquire()
    with pytest.raises(runs.OutputDirInUseError,
                       match=rf"in use by another caid-hf run \(PID {os.getpid()} on host "
                             rf"{socket.gethostname()}, started 20"):
        runs.OutputLock(tmp_path).acquire()
    first.release()
    runs.OutputLock(tmp_path).acquire().release()  # free again


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    import signal

    code = ("import sys, time\nfrom caid_hf.runs import OutputLock\n"
            "lock = OutputLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(runs.OutputDirInUseError, match=f"PID {holder.pid} "):
        runs.OutputLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    runs.OutputLock(tmp_path).acquire().release()


@pytest.mark.slow
def test_two_runs_started_together_on_one_folder_one_runs_one_refuses(tmp_path, uninterrupted):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    command = [str(Path(sys.executable).parent / "caid-hf"), "pretrain", *RUN]
    shared = tmp_path / "shared"
    runs = [subprocess.Popen([*command, "--output_dir", str(shared)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(run.wait(timeout=900), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [(code, err[-800:]) for code, _, err in results]
    refused = next(err for code, _, err in results if code == 2)
    assert "is in use by another caid-hf run (PID" in refused and "Traceback" not in refused
    assert_identical_runs(shared, uninterrupted)  # the run that ran is a whole run


@pytest.mark.parametrize("text, message", [
    ("learning_rate: [0.1, 0.2]\n", r"run\.yaml: learning_rate: expected a number, got \[0\.1, 0\.2\]"),
    ("logging_steps: 0\n", r"run\.yaml: logging_steps must be >= 1, got 0"),
    ("save_steps: -4\n", r"run\.yaml: save_steps must be >= 0, got -4"),
    ("warmup_steps: -5\n", r"run\.yaml: warmup_steps must be >= 0, got -5"),
    ("dataloader_num_workers: -1\n", r"run\.yaml: dataloader_num_workers must be >= 0, got -1"),
    ("num_train_epochs: ten\n", r"run\.yaml: num_train_epochs: expected an integer, got 'ten'"),
    ("channels_last: maybe\n", r"run\.yaml: channels_last: expected true or false"),
    ("crop_scale_min: 1.5\n", r"run\.yaml: crop_scale_min must be in \(0, 1\], got 1\.5"),
    ("mixed_precision: fp8\n", r"run\.yaml: mixed_precision must be 'auto'"),
    ("", r"run\.yaml is empty"),
    ("learning_rate: 0.1\n  warmup_steps: [\n", r"run\.yaml:\d+:\d+: invalid YAML"),
])
def test_yaml_values_are_checked_before_anything_is_built(tmp_path, monkeypatch, text, message):
    built = []
    monkeypatch.setattr("caid_hf.training.pretrain.CAiDForPreTraining.__init__",
                        lambda *a, **k: built.append(1))
    config = tmp_path / "run.yaml"
    config.write_text(text)
    key = text.split(":")[0]
    flags = [a for pair in zip(TINY[::2], TINY[1::2]) if pair[0] != f"--{key}" for a in pair]
    with pytest.raises(ValueError, match=message):
        main(["--config", str(config), *flags, "--output_dir", str(tmp_path / "out")])
    assert not built and not (tmp_path / "out").exists()


def test_flags_out_of_range_are_named_as_flags(tmp_path):
    with pytest.raises(ValueError, match=r"--max_steps must be >= 1 or -1, got 0"):
        main(TINY + ["--output_dir", str(tmp_path), "--max_steps", "0"])


def test_yaml_numbers_written_like_1e_3_are_numbers(tmp_path):
    from caid_hf.finetuning.arguments import parse_finetuning_args

    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 1e-3\nweight_decay: 0\n")  # YAML 1.1 reads 1e-3 as text
    _, _, args = parse_finetuning_args(["--config", str(config)])
    assert args.learning_rate == 0.001 and args.weight_decay == 0.0


@pytest.mark.slow
def test_two_process_run_killed_mid_epoch_resumes_bit_for_bit(tmp_path, free_port):
    """Two gloo processes, SIGKILLed during step 7 (5 steps an epoch: the last checkpoint,
    step 6, is mid-epoch), then the same command: weights, queue and optimizer at step 10
    equal an uninterrupted two-process run's."""
    script = ROOT / "tests" / "scripts" / "stream_resume.py"  # the killable entry point

    def launch(out, **kill):
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
               "CAID_DECODE_LOG": str(tmp_path), **{f"CAID_{k.upper()}": str(v)
                                                    for k, v in kill.items()}}
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(free_port), str(script),
               *RUN, "--num_train_phantoms", "40", "--per_device_train_batch_size", "4",
               "--output_dir", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)

    reference = tmp_path / "reference"
    proc = launch(reference)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "killed"
    assert launch(out, sigkill_at_step=7).returncode != 0
    assert latest_checkpoint(out).name == "checkpoint_6"
    proc = launch(out)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    assert_identical_runs(reference, out)
