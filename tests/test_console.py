"""The command line as a user meets it: --help everywhere, mistakes as one message with exit
status 2 and no traceback, "did you mean" for flags, one console style for every run."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from caid_hf.cli import COMMANDS, main
from caid_hf.console import (
    ArgumentParser,
    RunConsole,
    describe_hardware,
    format_duration,
    is_user_error,
    quiet_progress_bars,
    run_command,
    suggest_flag,
)

from helpers import ROOT, tiny_pretraining_args

TINY = tiny_pretraining_args(num_train_phantoms=16, max_steps=1)
FINETUNE_TINY = ["--encoder_name", "resnet18", "--image_size", "64", "--num_train_phantoms", "16",
                 "--num_validation_phantoms", "8", "--num_test_phantoms", "8",
                 "--phantom_size", "64", "--max_steps", "1", "--dataloader_num_workers", "0",
                 "--report_to", "none", "--bootstrap_resamples", "0"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_answers_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: caid-hf {command} ")  # the subcommand in the usage line
    assert len(out.splitlines()) > 3


def test_top_level_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrian"])
    assert exit_info.value.code == 2
    assert "did you mean 'pretrain'?" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py"])
def test_scripts_answer_help(script):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {script} [--config FILE.yaml]")
    assert "--gradient_checkpointing" in proc.stdout or "--freeze_encoder" in proc.stdout


def _user_error(argv: list[str], capsys) -> str:
    """Run ``caid-hf argv``; assert exit status 2 and no traceback; return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "CAID_HF_DEBUG" not in err  # a user's mistake has no traceback worth a hint
    return err


def test_yaml_key_typo_is_one_message(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("learnig_rate: 0.1\n")
    err = _user_error(["pretrain", "--config", str(config)], capsys)
    assert f"caid-hf pretrain: error: {config}: unknown key 'learnig_rate'; did you mean " \
           "'learning_rate'?" in err
    assert "CAID_HF_DEBUG" not in err  # a user's mistake: no debugging hint


@pytest.mark.parametrize("command,flag,suggestion", [
    ("pretrain", "--learnig_rate", "--learning_rate"),
    ("finetune", "--learnig-rate", "--learning_rate"),
    ("evaluate-features", "--imagesize", "--image_size"),
    ("prepare-data", "--num_prcs", "--num_proc"),
])
def test_mistyped_flag_gets_a_suggestion(command, flag, suggestion, capsys):
    argv = [command, flag, "0.1"]
    if command in ("evaluate-features", "prepare-data"):
        argv = [command, "phantoms", "--out", "x", flag, "64"]
    err = _user_error(argv, capsys)
    assert f"unknown flag {flag!r}; did you mean {suggestion!r}?" in err
    assert len(err.splitlines()) <= 3  # a short usage line, not the 60 fields


def test_missing_data_folder_is_one_message(tmp_path, capsys):
    missing = tmp_path / "no_such_folder"
    err = _user_error(["pretrain", *TINY, "--train_source", str(missing),
                       "--output_dir", str(tmp_path / "out")], capsys)
    assert f"data source '{missing}'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("command,extra,size,nearest", [
    ("pretrain", TINY, "70", "64 or 96"), ("finetune", FINETUNE_TINY, "70", "64 or 96"),
    ("pretrain", TINY, "100", "96 or 128"), ("finetune", FINETUNE_TINY, "100", "96 or 128"),
    ("evaluate-transfer", ["--backbones", "random"], "100", "96 or 128"),
    ("pretrain", TINY, "20", "32")])
def test_a_bad_image_size_is_one_message_naming_the_nearest_sizes(command, extra, size,
                                                                  nearest, tmp_path, capsys):
    err = _user_error([command, *extra, "--image_size", size,
                       "--output_dir", str(tmp_path / "out")], capsys)
    assert "image_size must be a positive multiple of 32" in err
    assert err.rstrip().endswith(f"got {size}; use {nearest}")


def test_used_output_folder_is_one_message(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    err = _user_error(["pretrain", *TINY, "--output_dir", str(out)], capsys)
    assert f"output_dir {out} already holds a run (best)" in err
    assert "--resume_from_checkpoint latest" in err
    assert (out / "best").is_dir()  # nothing was deleted


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("learnig_rate: 0.1\n")
    monkeypatch.setenv("CAID_HF_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown key 'learnig_rate'"):
        main(["pretrain", "--config", str(config)])


def test_programming_errors_keep_their_traceback():
    def bug():
        return {}["missing"]

    with pytest.raises(KeyError):
        run_command("caid-hf test", bug)
    # a ValueError raised inside a library (not by caid-hf's own checks) is a bug too
    with pytest.raises(RuntimeError):
        run_command("caid-hf test", lambda: torch.zeros(2) @ torch.zeros(3))
    try:
        int("x")
    except ValueError as error:
        assert not is_user_error(error)
    assert is_user_error(FileNotFoundError(2, "No such file", "x.yaml"))


def test_hand_written_flags_take_both_spellings():
    parser = ArgumentParser(prog="caid-hf test")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num_proc", type=int, default=1)
    assert parser.parse_args(["--image_size", "64"]).image_size == 64
    assert parser.parse_args(["--image-size", "32"]).image_size == 32
    assert parser.parse_args(["--num-proc", "3"]).num_proc == 3
    help_text = parser.format_help()
    assert "--image-size" in help_text and "--image_size" not in help_text  # one spelling shown
    assert suggest_flag("--imag_size", ["--image-size", "--image_size"]) == \
        "; did you mean '--image_size'?"
    assert suggest_flag("--zzz", ["--image-size"]) == ""


def test_hardware_names_processes_sharing_a_cpu(monkeypatch):
    cpu = torch.device("cpu")
    cores = os.cpu_count()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert describe_hardware(SimpleNamespace(num_processes=1, device=cpu)) == \
        f"CPU ({cores} cores)"
    assert describe_hardware(SimpleNamespace(num_processes=2, device=cpu)) == \
        f"2 processes sharing one CPU ({cores} cores)"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert describe_hardware(SimpleNamespace(num_processes=4, device=cpu)) == \
        f"4 processes on 2 machines' CPUs ({cores} cores each)"


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (4.4, 64, 3725)] == ["4 s", "1 min 04 s", "1 h 02 min"]


def test_quiet_progress_bars_restores_the_setting():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with quiet_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


def test_console_without_terminal_prints_plain_log_lines(capsys):
    import io

    console = RunConsole(stream=io.StringIO())  # not a terminal: no bar
    console.header("header")
    console.bar(10, desc="x")
    console.update(1, loss="1.0")
    console.log("step 1/10: loss 1.0")
    console.say("validation")
    console.summary("done")
    assert capsys.readouterr().out.splitlines() == [
        "header", "step 1/10: loss 1.0", "validation", "done"]
    assert console.stream.getvalue() == ""  # no bar was drawn


CURSOR_CODES = re.compile(r"\x1b\[|\r")


@pytest.mark.slow
def test_pretraining_log_file_is_plain_and_ends_with_a_summary(tmp_path):
    """stdout and stderr of a run redirected to a file, as on a cluster."""
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, "-m", "caid_hf.cli", "pretrain", *TINY,
                               "--max_steps", "4", "--logging_steps", "2",
                               "--output_dir", str(out)],
                              stdout=handle, stderr=subprocess.STDOUT, timeout=600,
                              env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "Writing model shards" not in text and not CURSOR_CODES.search(text)
    lines = text.strip().splitlines()
    assert lines[0].startswith("CAiD pre-training: moco_v2 + context prediction (CAiD)")
    assert "step 2/4: loss" in text and re.search(r"step 4 \(epoch \d\) validation: loss", text)
    tail = "\n".join(lines[-6:])
    assert re.search(r"done: 4 steps in \d+ s \([\d.]+ images/s\)", tail)
    assert re.search(rf"best validation loss \d+\.\d{{4}} at step 4 -> {out / 'best'}", tail)
    assert f"last step 4 -> {out / 'final'}" in tail


def test_finetuning_ends_with_a_summary_and_announces_early_stopping(tmp_path, capsys):
    out = tmp_path / "clf"
    main(["finetune", *FINETUNE_TINY, "--max_steps", "-1", "--num_train_epochs", "4",
          "--per_device_train_batch_size", "8", "--eval_steps", "1",
          "--early_stopping_patience", "1", "--early_stopping_threshold", "1.0",
          "--early_stopping_min_steps", "0",
          "--output_dir", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("fine-tuning (classification: nodule) from random, resnet18 at "
                               f"64 px -> {out}")
    # threshold 1.0: no validation after the first can improve, so patience 1 stops at step 2
    assert "stopped early at step 2 of 8: validation mean_auc did not improve for 1 " \
           "validations (best" in "\n".join(lines)
    assert re.match(r"done: 2 steps in \d+ s \([\d.]+ images/s\)", lines[-4])
    assert lines[-3].startswith("  best validation mean_auc ") and "at step 1" in lines[-3]
    assert lines[-2].startswith("  test (8 images): mean_auc ")
    assert lines[-1] == (f"  model -> {out} (test_results.json, trainer_state.json, "
                         "README.md)")


@pytest.mark.parametrize("command,argv,expected", [
    ("pretrain", ["--learnig_rate", "1", "--momentum", "2", "--image_size", "100"],
     ["unknown flag '--learnig_rate'; did you mean '--learning_rate'?",
      "--image_size must be a positive multiple of 32 (the U-Net halves it 5 times), got 100; "
      "use 96 or 128",
      "--momentum must be in [0, 1), got 2.0"]),
    ("finetune", ["--learnig-rate", "1", "--label_fraction", "0", "--image_size", "100"],
     ["unknown flag '--learnig-rate'; did you mean '--learning_rate'?",
      "--image_size must be a positive multiple of 32 (the U-Net halves it 5 times), got 100; "
      "use 96 or 128",
      "--label_fraction must be in (0, 1], got 0.0"]),
])
def test_three_mistakes_are_reported_at_once(command, argv, expected, tmp_path, capsys):
    err = _user_error([command, *argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert err.splitlines()[0] == f"caid-hf {command}: error: 3 mistakes:"
    assert err.splitlines()[1:] == [f"  {k}. {m}" for k, m in enumerate(expected, 1)]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_three_mistakes_in_a_yaml_file_name_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("momentum: 2\nimage_size: 100\nqueue_size: 0\n")
    err = _user_error(["pretrain", "--config", str(config)], capsys)
    assert "3 mistakes:" in err
    assert f"{config}: image_size must be a positive multiple of 32" in err
    assert f"{config}: momentum must be in [0, 1), got 2.0" in err
    assert f"{config}: queue_size must be positive, got 0" in err
