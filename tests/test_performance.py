"""Speed settings (caid_hf.performance), MoCo's multi-tensor momentum update and
the training-step benchmark script."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from caid_hf import CAiDConfig, CAiDForPreTraining, performance
from caid_hf.objectives.moco import MoCoV2

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Set the CPU's torch capability and /proc/cpuinfo flags seen by the helpers."""

    def fake(capability: str, flags: str) -> None:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(performance, "CPUINFO", cpuinfo)

    return fake


@pytest.mark.parametrize("capability, flags, expected", [
    ("AVX512", "avx2 avx512f avx512_bf16", torch.bfloat16),  # e.g. AMD Zen 4, Cooper Lake
    ("AVX512", "avx2 avx512f amx_bf16 amx_tile", torch.bfloat16),  # Sapphire Rapids
    ("AVX512", "avx2 avx512f", None),  # Skylake-X: AVX-512 without bf16 arithmetic
    ("AVX2", "avx2", None),
    ("AVX2", "avx2 avx512_bf16", None),  # torch not built/running with AVX-512 kernels
    ("DEFAULT", "", None),
])
def test_cpu_autocast_dtype(cpu, capability, flags, expected):
    cpu(capability, flags)
    assert performance.autocast_dtype("cpu") is expected
    assert performance.resolve_mixed_precision("auto", "cpu") == ("bf16" if expected else "no")
    assert performance.resolve_mixed_precision("no", "cpu") == "no"


@pytest.mark.parametrize("major, expected", [(7, None), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_cuda_autocast_dtype(monkeypatch, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    assert performance.autocast_dtype("cuda:0") is expected


def test_other_devices_stay_fp32():
    assert performance.autocast_dtype("meta") is None


@pytest.mark.parametrize("device, capability, flags, precision, channels_last, expected", [
    # a CPU with bf16 instructions: both precisions and both memory formats are timed
    ("cpu", "AVX512", "avx512f avx512_bf16", "auto", None,
     ["fp32, channels_last", "fp32, contiguous", "bf16, channels_last", "bf16, contiguous"]),
    ("cpu", "AVX512", "avx512f amx_bf16 amx_tile", "auto", False,
     ["fp32, contiguous", "bf16, contiguous"]),
    # no bf16 arithmetic: torch emulates bf16, several times slower, so it is not timed
    ("cpu", "AVX2", "avx2", "auto", None, ["fp32, channels_last", "fp32, contiguous"]),
    ("cpu", "AVX512", "avx512f", "auto", True, ["fp32, channels_last"]),
    # a precision given: only the memory format is left to time
    ("cpu", "AVX512", "avx512f avx512_bf16", "no", None, ["fp32, channels_last", "fp32, contiguous"]),
    ("cpu", "AVX512", "avx512f avx512_bf16", "bf16", True, ["bf16, channels_last"]),
    ("cpu", "AVX512", "avx512f avx512_bf16", "bf16", None, ["bf16, channels_last", "bf16, contiguous"]),
    ("cpu", "AVX2", "avx2", "bf16", None, ["bf16, channels_last"]),  # emulated: contiguous is far slower
])
def test_step_setting_candidates(cpu, device, capability, flags, precision, channels_last, expected):
    cpu(capability, flags)
    candidates = performance.step_setting_candidates(precision, channels_last, device)
    assert [c.label for c in candidates] == expected


@pytest.mark.parametrize("major, expected", [(9, "bf16, channels_last"), (7, "fp32, channels_last")])
def test_a_gpu_has_one_candidate_known_without_measuring(monkeypatch, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    candidates = performance.step_setting_candidates("auto", None, "cuda:0")
    assert [c.label for c in candidates] == [expected]
    choice = performance.calibrate_step_settings(candidates, make_step=None, shape={})
    assert choice.how == "requested" and choice.ms_per_step == {}


FP32_CL, FP32, BF16_CL = (performance.StepSettings("no", True), performance.StepSettings("no", False),
                          performance.StepSettings("bf16", True))


@pytest.mark.parametrize("seconds, expected", [
    ({FP32_CL: 1.0, FP32: 0.96, BF16_CL: 0.97}, FP32_CL),  # 4 % and 3 % faster: within the margin
    ({FP32_CL: 1.0, FP32: 0.96, BF16_CL: 0.94}, BF16_CL),  # 6 % faster: chosen
    ({FP32_CL: 1.0, FP32: 0.80, BF16_CL: 0.94}, FP32),  # the fastest of those beyond the margin
    ({FP32_CL: 1.0, FP32: 1.20, BF16_CL: float("inf")}, FP32_CL),  # a failed arm never wins
])
def test_choose_faster_keeps_the_reference_within_the_margin(seconds, expected):
    assert performance.choose_faster(seconds) == expected


@pytest.fixture
def clock(monkeypatch):
    """A virtual clock for the calibration's timing: ``clock.steps(durations)`` gives
    ``make_step`` whose steps of each settings take the given seconds in turn (warm-up
    first); ``clock.calls`` lists the steps run, by label."""
    now = [0.0]
    fake = types.SimpleNamespace(perf_counter=lambda: now[0], monotonic=time.monotonic,
                                 sleep=time.sleep, strftime=time.strftime)
    monkeypatch.setattr(performance, "time", fake)
    calls = []

    def steps(durations: dict):
        def make_step(settings):
            left = iter(durations[settings])

            def step():
                calls.append(settings.label)
                now[0] += next(left)

            return step

        return make_step

    return types.SimpleNamespace(steps=steps, calls=calls)


def test_time_step_settings_interleaves_arms_and_stops_timing_a_hopeless_one(clock):
    import itertools

    make_step = clock.steps({FP32_CL: itertools.repeat(3.0), FP32: itertools.repeat(1.0)})
    times = performance.time_step_settings(make_step, [FP32_CL, FP32], rounds=2)
    # warm-ups, round 1 in order; the reference took 3x the other: not timed again;
    # round 2 (reversed) of the other, steady: done
    assert clock.calls == ["fp32, channels_last", "fp32, contiguous", "fp32, channels_last",
                           "fp32, contiguous", "fp32, contiguous"]
    assert times == {FP32_CL: [3.0], FP32: [1.0, 1.0]}


def test_unsteady_steps_are_timed_more_and_measured_again_when_the_machine_is_idle(
        clock, tmp_path, monkeypatch):
    idle = [False]
    monkeypatch.setattr(performance, "machine_idle", lambda: idle[0])
    make_step = clock.steps({FP32_CL: [1.0, 1.0, 1.5, 1.0, 1.5], FP32: [1.2] * 5})
    choice = performance.calibrate_step_settings([FP32_CL, FP32], make_step, {},
                                                 cache_dir=tmp_path)
    # one arm's steps differ by 50 %: timed up to the most rounds (4), its fastest step counts
    assert len(clock.calls) == 2 + 4 * 2
    assert choice.ms_per_step == {"fp32, channels_last": 1000.0, "fp32, contiguous": 1200.0}
    assert choice.settings == FP32_CL and choice.how == "measured" and not choice.steady
    # kept: a start on a machine still busy reuses it rather than paying for it again
    del clock.calls[:]
    again = performance.calibrate_step_settings([FP32_CL, FP32], None, {}, cache_dir=tmp_path)
    assert again.how == "cached" and not again.steady and clock.calls == []
    # a start on an idle machine measures again; steady steps are then kept for good
    idle[0] = True
    make_step = clock.steps({FP32_CL: [1.0] * 3, FP32: [0.5] * 3})
    remeasured = performance.calibrate_step_settings([FP32_CL, FP32], make_step, {},
                                                     cache_dir=tmp_path)
    assert remeasured.how == "measured" and remeasured.steady and remeasured.settings == FP32
    del clock.calls[:]
    again = performance.calibrate_step_settings([FP32_CL, FP32], None, {}, cache_dir=tmp_path)
    assert again.how == "cached" and again.settings == FP32 and clock.calls == []
    assert again.ms_per_step == {"fp32, channels_last": 1000.0, "fp32, contiguous": 500.0}


def _tiny_calibration(tmp_path, slow: performance.StepSettings):
    """Calibrate the tiny pre-training step (ResNet-18 U-Net, 64 px, batch 4) with its real
    forward and backward, ``slow``'s step made eleven times slower (a sleep of ten times its
    own duration after it: on this shared machine two settings' timings were seen 4x apart
    by load alone, far less than that)."""
    from caid_hf.training.arguments import parse_pretraining_args
    from caid_hf.training.pretrain import calibration_shape, calibration_steps

    model_args, data_args, args = parse_pretraining_args(
        ["--encoder_name", "resnet18", "--image_size", "64", "--queue_size", "32",
         "--projection_dim", "16", "--per_device_train_batch_size", "4"])
    config = CAiDConfig(**dataclasses.asdict(model_args))
    real = calibration_steps(config, data_args, args, torch.device("cpu"))
    made = []

    def make_step(settings):
        step = real(settings)
        made.append(settings)
        if settings != slow:
            return step

        def slow_step():
            start = time.perf_counter()
            step()
            time.sleep(10 * (time.perf_counter() - start))

        return slow_step

    choice = performance.calibrate_step_settings([FP32_CL, FP32], make_step,
                                                 calibration_shape(config, args),
                                                 cache_dir=tmp_path / "cache")
    return choice, made


@pytest.mark.parametrize("slow, expected", [(FP32_CL, FP32), (FP32, FP32_CL)])
def test_calibration_picks_the_faster_arm_when_one_is_made_slow(tmp_path, slow, expected):
    choice, made = _tiny_calibration(tmp_path, slow)
    assert choice.how == "measured" and choice.settings == expected
    assert made == [FP32_CL, FP32]
    assert choice.ms_per_step[slow.label] > choice.ms_per_step[expected.label]


def test_calibration_cache_key_file_and_corruption(tmp_path, monkeypatch):
    monkeypatch.setenv(performance.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(performance, "time_step_settings",
                        lambda make_step, candidates, rounds=2, **kwargs: timed.append(1) or
                        {FP32_CL: [1.0], FP32: [0.5]})
    timed = []
    shape = {"encoder_name": "resnet18", "image_size": 64, "batch_size": 4}
    first = performance.calibrate_step_settings([FP32_CL, FP32], None, shape)
    path = tmp_path / "cache" / performance.CALIBRATION_FILE
    assert first.how == "measured" and first.settings == FP32 and path.is_file()
    assert performance.calibrate_step_settings([FP32_CL, FP32], None, shape).how == "cached"
    # another batch size, other candidates, another thread count or torch: measured again
    assert performance.calibrate_step_settings([FP32_CL, FP32], None,
                                               {**shape, "batch_size": 8}).how == "measured"
    assert performance.calibrate_step_settings([FP32_CL, FP32, BF16_CL], None,
                                               shape).how == "measured"
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert performance.calibrate_step_settings([FP32_CL, FP32], None, shape).how == "measured"
    assert len(timed) == 4
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 4 and entries[0]["key"]["threads"] == torch.get_num_threads()
    assert entries[0]["key"]["cpu"] == performance.cpu_model_name()
    # a damaged file is ignored and rewritten whole; no temporary file is left behind
    path.write_text('{"entries": [{"key": ')
    again = performance.calibrate_step_settings([FP32_CL, FP32], None, shape)
    assert again.how == "measured" and len(timed) == 5
    assert len(json.loads(path.read_text())["entries"]) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [".step_settings.lock",
                                                            "step_settings.json"]


def test_calibration_cache_folder_defaults_to_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.delenv(performance.CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert performance.calibration_cache_dir() == tmp_path / "caid-hf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert performance.calibration_cache_dir() == tmp_path / "home" / ".cache" / "caid-hf"


def test_calibration_draws_nothing_from_the_random_streams(tmp_path):
    import random

    import numpy as np

    def make_step(settings):
        torch.rand(3)
        return lambda: (torch.randperm(10), np.random.rand(), random.random())

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    expected = (torch.rand(2), np.random.rand(), random.random())
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    performance.calibrate_step_settings([FP32_CL, FP32], make_step, {}, cache_dir=tmp_path)
    assert torch.equal(torch.rand(2), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


def test_header_names_the_choice_each_arm_and_the_flags_that_override_it():
    from caid_hf.training.pretrain import step_settings_lines

    cpu = torch.device("cpu")
    measured = performance.StepSettingsChoice(
        FP32, "measured", {"fp32, channels_last": 812.0, "fp32, contiguous": 640.4}, seconds=5.04)
    assert step_settings_lines(measured, ("auto", None), cpu) == [
        "  step settings: fp32, contiguous (measured now in 5.0 s)",
        "    time per step: fp32, channels_last: 812 ms; fp32, contiguous: 640 ms; another "
        "setting must take 5% less than the first to be chosen",
        "    --mixed_precision no|bf16 and --channels_last true|false override this choice",
        f"    CPU: {performance.describe_cpu()}"]
    known = performance.StepSettingsChoice(BF16_CL, "known")
    assert step_settings_lines(known, ("auto", True), torch.device("cuda")) == [
        "  step settings: bf16, channels_last (known for this device, nothing measured)",
        "    --mixed_precision no|bf16 overrides this choice"]
    given = performance.StepSettingsChoice(FP32, "requested")
    assert step_settings_lines(given, ("no", False), cpu)[0] == (
        "  step settings: fp32, contiguous (as requested)")


def test_first_training_step_is_the_same_with_and_without_calibration(tmp_path, monkeypatch):
    """A run that times its candidates (real steps of its model: MoCo's shuffles draw from
    torch's stream) trains exactly as a run given the same settings, which times nothing."""
    import yaml

    monkeypatch.setenv(performance.CACHE_VARIABLE, str(tmp_path / "cache"))
    timed = []
    real = performance.time_step_settings
    monkeypatch.setattr(performance, "time_step_settings",
                        lambda *a, **k: timed.append(1) or real(*a, **k))
    measured = _pretrain(tmp_path, "measured", "--max_steps", "1")
    chosen = yaml.safe_load((tmp_path / "measured" / "run_config.yaml").read_text())
    assert timed == [1] and chosen["step_settings"]["decided_by"] == "measured"
    given = _pretrain(tmp_path, "given", "--max_steps", "1", "--mixed_precision",
                      chosen["training"]["mixed_precision"], "--channels_last",
                      str(chosen["training"]["channels_last"]).lower())
    assert timed == [1]  # nothing left to decide
    first = [h for h in measured.history if "train/loss" in h]
    assert [h["train/loss"] for h in first] == [
        h["train/loss"] for h in given.history if "train/loss" in h]
    for key, value in measured.model.state_dict().items():
        assert torch.equal(value, given.model.state_dict()[key]), key


def test_cpu_flags_reads_the_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert performance.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert performance.cpu_flags(tmp_path / "missing") == frozenset()


def test_describe_cpu_names_model_capability_bf16_flags_and_threads(cpu, tmp_path):
    cpu("AVX512", "avx2 avx512f avx512_bf16")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some   CPU 9000\n" + cpuinfo.read_text())
    line = performance.describe_cpu(threads=3)
    assert line.startswith("Some CPU 9000; torch kernels AVX512; avx512_bf16 yes, amx_bf16 no; 3 threads of ")


def test_autocast_context_casts_only_with_a_dtype():
    layer = torch.nn.Linear(4, 4)
    x = torch.rand(2, 4)
    with performance.autocast("cpu", torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    with performance.autocast("cpu", None):
        assert layer(x).dtype == torch.float32


def test_channels_last_and_sgd_settings():
    model = CAiDForPreTraining(CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32,
                                          projection_dim=16))
    performance.to_channels_last(model)
    assert model.caid.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.objective.queue.is_contiguous()  # 2-D buffers untouched
    out = model.caid.encoder(torch.rand(2, 3, 64, 64))[-1]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert performance.use_channels_last("cpu") and performance.use_channels_last("cuda")
    assert not performance.use_channels_last("meta")
    assert performance.sgd_implementation("cpu") == {"fused": True}


def test_fused_sgd_matches_the_plain_loop():
    torch.manual_seed(0)
    params = [torch.randn(8, 3, 3, 3, requires_grad=True), torch.randn(8, requires_grad=True)]
    copies = [p.detach().clone().requires_grad_() for p in params]
    hyper = {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4}
    fast = torch.optim.SGD(params, **hyper, **performance.sgd_implementation("cpu"))
    plain = torch.optim.SGD(copies, **hyper, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, c, g in zip(params, copies, grads):
            p.grad, c.grad = g.clone(), g.clone()
        fast.step()
        plain.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p, c, rtol=0, atol=1e-6)


def test_foreach_momentum_update_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                  torch.nn.Conv2d(8, 16, 1))
    moco = MoCoV2(encoder, feature_dim=16, projection_dim=4, queue_size=8, momentum=0.99)
    with torch.no_grad():  # the two branches apart, as after some training
        for p in [*encoder.parameters(), *moco.projection_head.parameters()]:
            p.add_(torch.randn_like(p))
    expected = [p.clone() for p in moco.momentum_parameters()]
    queries = [*encoder.parameters(), *moco.projection_head.parameters()]
    for k, q in zip(expected, queries):  # the original: one parameter at a time
        k.copy_(k * moco.momentum + q * (1.0 - moco.momentum))
    buffers = [b.clone() for b in moco.momentum_encoder.buffers()]
    moco.momentum_update(encoder)
    for k, e in zip(moco.momentum_parameters(), expected):
        torch.testing.assert_close(k, e, rtol=0, atol=1e-7)
    for b, before in zip(moco.momentum_encoder.buffers(), buffers):
        assert torch.equal(b, before)


def test_training_step_with_fast_path_settings_matches_fp32_closely():
    """bf16 autocast + channels_last + foreach SGD: one step's loss near the fp32 loss."""
    config = CAiDConfig(encoder_name="resnet18", image_size=64, queue_size=32, projection_dim=16)
    torch.manual_seed(0)
    fp32 = CAiDForPreTraining(config).train()
    fast = performance.to_channels_last(copy.deepcopy(fp32))
    g = torch.Generator().manual_seed(0)
    q, k, target = (torch.rand(4, c, 64, 64, generator=g) for c in (3, 3, 1))
    torch.manual_seed(1)
    reference = fp32(q, k, labels=target).loss
    torch.manual_seed(1)
    with performance.autocast("cpu", torch.bfloat16):
        out = fast(q, k, labels=target)
    assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert fast.objective.queue.dtype == torch.float32
    torch.testing.assert_close(out.loss, reference, rtol=0.05, atol=0)
    out.loss.backward()
    optimizer = torch.optim.SGD([p for p in fast.parameters() if p.requires_grad], lr=0.1,
                                **performance.sgd_implementation("cpu"))
    optimizer.step()
    assert all(p.dtype == torch.float32 for p in fast.parameters())


@pytest.mark.slow
def test_benchmark_script_prints_one_line_per_mode():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--encoder", "resnet18",
         "--image-size", "64", "--batch-size", "4", "--steps", "2", "--mode", "both"],
        capture_output=True, text=True, timeout=600, check=True)
    lines = [line for line in result.stdout.splitlines() if "images/s" in line]
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("baseline") and lines[1].startswith("default")
    assert "ratio default/baseline" in result.stdout
    assert result.stdout.startswith("CPU: ") and "--precision auto: " in result.stdout


@pytest.mark.slow
def test_benchmark_interleaves_auto_with_fixed_precisions_and_names_the_cpu(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--encoder", "resnet18",
         "--image-size", "64", "--batch-size", "4", "--queue-size", "64", "--steps", "3",
         "--warmup", "1", "--mode", "default", "--precision", "auto", "fp32",
         "--calibration-cache", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=True)
    out = result.stdout
    assert out.startswith(f"CPU: {performance.cpu_model_name()}; torch kernels "), out
    # auto times every candidate of this CPU (bf16 too where it has bf16 instructions)
    candidates = [c.label for c in performance.step_setting_candidates("auto", None, "cpu")]
    per_step = "; ".join(f"{re.escape(label)}: \\d+ ms" for label in candidates)
    chosen = re.search(r"^--precision auto: ((fp32|bf16), (channels_last|contiguous)) \(measured "
                       r"in [\d.]+ s(, unsteady steps \(a busy machine\?\))?; per step "
                       + per_step + r"\)$", out, re.MULTILINE)
    assert chosen and chosen[1] in candidates, out
    arms = re.findall(r"^  (auto|fp32) \((fp32|bf16), (\w+)\) +[\d.]+ images/s", out,
                      re.MULTILINE)
    assert [(a[0], f"{a[1]}, {a[2]}") for a in arms][0] == ("auto", chosen[1]), out
    assert [a[0] for a in arms] == ["auto", "fp32"] and arms[1][1] == "fp32", out
    assert re.search(r"auto / faster fixed arm fp32 .*auto within 3 % of it: (yes|NO)$", out,
                     re.MULTILINE), out


@pytest.mark.slow
def test_paired_splits_benchmark_prints_each_ratio_with_its_interval():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--encoder", "resnet18",
         "--image-size", "64", "--batch-size", "4", "--steps", "5", "--warmup", "1",
         "--mode", "splits-paired", "--id-only"],
        capture_output=True, text=True, timeout=600, check=True)
    lines = [line for line in result.stdout.splitlines() if "images/s" in line]
    assert len(lines) == 4, result.stdout
    intervals = re.findall(r"ratio (\d+\.\d+) .*95 % interval (\d+\.\d+)–(\d+\.\d+)",
                           result.stdout)
    # each ratio is the median of its paired rounds and lies inside its own percentile
    # interval by construction; what can go wrong is that one is missing or malformed
    assert len(intervals) == 3, result.stdout


def _pretrain(tmp_path, name, *extra):

    from caid_hf.training.pretrain import main

    return main(TINY + ["--output_dir", str(tmp_path / name), "--max_steps", "3",
                        "--num_train_epochs", "1", *extra])


def test_pretraining_uses_the_fast_path_by_default(tmp_path, monkeypatch):
    import yaml
    from safetensors.torch import load_file

    monkeypatch.setenv(performance.CACHE_VARIABLE, str(tmp_path / "cache"))
    # channels_last measured faster than contiguous on this machine (the reference arm)
    monkeypatch.setattr(performance, "time_step_settings",
                        lambda make_step, candidates, rounds=2, **kwargs: {c: [1.0 + c.label.count("bf16")
                                                                  + 0.5 * (not c.channels_last)]
                                                                 for c in candidates})
    result = _pretrain(tmp_path, "fast")
    chosen = yaml.safe_load((tmp_path / "fast" / "run_config.yaml").read_text())
    # 'auto' and the unset memory format are recorded as what was chosen, and how
    assert chosen["training"]["mixed_precision"] == "no"
    assert chosen["training"]["channels_last"] is True
    assert chosen["step_settings"]["requested_mixed_precision"] == "auto"
    assert chosen["step_settings"]["requested_channels_last"] is None
    assert chosen["step_settings"]["decided_by"] == "measured"
    assert chosen["step_settings"]["ms_per_step"]["fp32, contiguous"] == 1500.0
    conv = result.model.caid.encoder.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # published weights are ordinary (contiguous) tensors equal to the trained ones
    saved = load_file(tmp_path / "fast" / "final" / "model.safetensors")
    assert saved["encoder.conv1.weight"].is_contiguous()
    assert torch.equal(saved["encoder.conv1.weight"], conv.detach())
    # the returned model is plain: Accelerate's autocast wrapper is gone from its forward
    assert result.model.forward.__func__ is CAiDForPreTraining.forward
    views = torch.rand(2, 3, 64, 64)  # and it keeps transformers' return_dict handling
    assert isinstance(result.model.eval()(views, views, return_dict=False), tuple)
    losses = [h["train/loss"] for h in result.history if "train/loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_pretraining_with_gradient_checkpointing_trains_like_without(tmp_path):
    """fp32, contiguous: the same three steps with and without checkpointing (the
    recomputation neither changes gradients nor updates BatchNorm statistics twice)."""
    plain = _pretrain(tmp_path, "plain", "--mixed_precision", "no", "--channels_last", "false")
    ckpt = _pretrain(tmp_path, "ckpt", "--mixed_precision", "no", "--channels_last", "false",
                     "--gradient_checkpointing", "true")
    assert ckpt.model.caid.gradient_checkpointing and not plain.model.caid.gradient_checkpointing
    for a, b in zip(plain.history, ckpt.history):
        for key in ("train/loss", "val/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    trained, other = plain.model.state_dict(), ckpt.model.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_compile_targets_encoders_and_decoders_not_the_moco_bookkeeping(monkeypatch, tiny_config):
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
    from segmentation_models_pytorch.encoders._base import EncoderMixin

    model = CAiDForPreTraining(tiny_config)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    from torch._inductor import cpp_builder  # (a machine without a C++ compiler would warn)

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "c++")
    assert performance.compile_model(model, "cpu") is model
    # query encoder, momentum (key) encoder and decoder; never the whole model, whose key
    # branch indexes with torch.randperm (an inductor crash on torch 2.11 + CUDA)
    assert model not in compiled and model.objective not in compiled
    assert {id(m) for m in compiled} == {id(model.caid.encoder), id(model.objective.momentum_encoder),
                                        id(model.caid.decoder)}
    assert all(isinstance(m, (EncoderMixin, UnetDecoder)) for m in compiled)


class _TinyEncoder(torch.nn.Module):
    """An smp-like encoder (a list of stages, ``out_channels``) of one convolution, split
    BatchNorm and ReLU: small enough for inductor to compile in seconds."""

    out_channels = (3, 8)

    def __init__(self):
        super().__init__()
        from caid_hf.objectives.shuffle_bn_emulation import SplitBatchNorm2d

        self.stage = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                         SplitBatchNorm2d(8), torch.nn.ReLU(inplace=True))

    def forward(self, x):
        return [x, self.stage(x)]


class _TinyMoCoStep(torch.nn.Module):
    """The query branch in one pass of the emulation and MoCo's objective (momentum update,
    key encoder with shuffle-BN emulated in 2 sub-batches, loss against the queue, enqueue),
    as CAiDForPreTraining composes them."""

    def __init__(self):
        super().__init__()
        self.encoder = _TinyEncoder()
        self.objective = MoCoV2(self.encoder, feature_dim=8, projection_dim=4, queue_size=12,
                                shuffle_bn_splits=2)

    def forward(self, query, key):
        from caid_hf.objectives.common import global_pool
        from caid_hf.objectives.shuffle_bn_emulation import encode_in_splits

        features = encode_in_splits(self.encoder, query, 2)
        return self.objective(global_pool(features[-1]), key, self.encoder).loss


@pytest.mark.slow
def test_the_shuffle_bn_emulation_and_the_queue_compile_with_inductor():
    """MoCo's step with the one-process shuffle-BN emulation (split BatchNorms in both
    branches, the queue) compiled by inductor: three training steps give the eager steps'
    losses, gradients, weights, running statistics, queue and pointer (fp32, 1e-5: the
    traced BatchNorms sum in another order). What it guards, both seen compiling the whole
    pre-training model on this CPU: the kernel path's running-statistics update once per
    sub-batch stops inductor (an AssertionError on chained ``copy_``), and compiled, the
    queue's copy for the loss was optimised away, so the backward read the queue after the
    enqueue (gradients off by up to 0.4 with equal losses; with a graph break before the
    enqueue, "modified by an inplace operation"). ``benchmarks/train_step.py --compile
    whole`` compiles the whole model (minutes here)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # no C++ compiler: inductor cannot build CPU kernels
        pytest.skip(f"no C++ compiler for inductor: {exc}")
    torch.manual_seed(0)
    base = _TinyMoCoStep().train()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(6, 3, 10, 10, generator=g),
                torch.rand(6, 3, 10, 10, generator=g)) for _ in range(3)]
    runs = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        torch._dynamo.reset()
        step = torch.compile(model) if compiled else model
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                    lr=0.5, momentum=0.9)
        losses, grads = [], []
        torch.manual_seed(1)
        for query, key in batches:
            loss = step(query, key)
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None})
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs.append((losses, grads, model.state_dict()))
    (eager_losses, eager_grads, eager_state), (losses, grads, state) = runs
    assert losses == pytest.approx(eager_losses, abs=1e-5)
    for eager_step, step_grads in zip(eager_grads, grads):
        assert step_grads.keys() == eager_step.keys() and len(step_grads) == 8
        for name, value in eager_step.items():
            torch.testing.assert_close(step_grads[name], value, rtol=0, atol=1e-5, msg=name)
    for name, value in eager_state.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-5, msg=name)
    assert int(state["objective.queue_ptr"]) == 18 % 12
    bn = "encoder.stage.1.running_var"
    assert (state[bn] - base.state_dict()[bn]).abs().max() > 1e-3
