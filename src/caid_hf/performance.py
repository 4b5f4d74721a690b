"""Speed settings of a training step: mixed precision, memory format, optimizer kernels,
gradient checkpointing and compilation, each decided for the device at hand.

Precision and memory format are decided by measuring where the answer depends on the CPU
(:func:`calibrate_step_settings`): bf16 autocast made a CAiD step about twice as fast as
fp32 on a CPU with AMX, but 23-29 % slower on an AVX-512 BF16 CPU without AMX and several
times slower on a CPU without bf16 instructions, where torch emulates it; channels_last was
1.26x faster than contiguous tensors on the AVX-512 CPU and slower on an AVX2 one
(``benchmarks/train_step.py``, figures with their CPU in ``benchmarks/RESULTS.md``). On
GPUs the answer is known (bf16 from Ampere on, channels_last). Losses and MoCo's queue stay
fp32 whatever the autocast dtype (the objectives cast to fp32 themselves).

In an Accelerate loop, autocast comes from ``Accelerator(mixed_precision=...)``, which also
works on a CPU; :func:`autocast` is for code that runs the model without Accelerate
(benchmarks, evaluation scripts, the calibration).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

CPUINFO = Path("/proc/cpuinfo")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path | None = None) -> frozenset[str]:
    """The CPU feature flags the kernel reports (first ``flags`` line of ``cpuinfo``, by
    default :data:`CPUINFO`); empty where there is no such file (not Linux)."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_model_name(cpuinfo: str | Path | None = None) -> str:
    """The CPU's marketing name (first ``model name`` line of ``cpuinfo``, by default
    :data:`CPUINFO`; ``platform.processor()`` where there is no such file)."""
    try:
        text = Path(cpuinfo or CPUINFO).read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return " ".join(line.partition(":")[2].split())
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def describe_cpu(threads: int | None = None, cpuinfo: str | Path | None = None) -> str:
    """One line naming the CPU a figure was measured on: its model name, torch's kernel
    capability (``torch.backends.cpu.get_cpu_capability()``), whether it reports the bf16
    instructions (``avx512_bf16``, ``amx_bf16``) and the torch threads used (``threads``,
    by default ``torch.get_num_threads()``) out of the cores it has, e.g.
    ``"AMD EPYC; torch kernels AVX2; avx512_bf16 no, amx_bf16 no; 2 threads of 2 cores"``.
    bf16 speed depends on those flags: fast with AMX, slower than fp32 without."""
    flags = cpu_flags(cpuinfo)
    threads = torch.get_num_threads() if threads is None else threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in _CPU_BF16_FLAGS)
    return (f"{cpu_model_name(cpuinfo)}; torch kernels {torch.backends.cpu.get_cpu_capability()}; "
            f"{bf16}; {threads} thread{'s' if threads != 1 else ''} of {cores} cores")


def cpu_supports_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic at all: torch's kernels are built for AVX-512
    here (``torch.backends.cpu.get_cpu_capability()``) and the CPU reports ``avx512_bf16``
    or ``amx_bf16``. Only then is bf16 worth measuring (:func:`step_setting_candidates`):
    without them torch emulates bf16, and a step took far longer than in fp32 on a
    2-core AVX2 CPU (channels_last: 7x; contiguous: 70x; ResNet-18 U-Net, 64 px, batch 32)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability and "AMX" not in capability:
        return False
    return any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a step can use on ``device`` without measuring, or None for fp32.

    bf16 on CUDA GPUs of compute capability 8.0 or newer (Ampere, Hopper, …) and on CPUs
    where :func:`cpu_supports_bf16`; None elsewhere (older GPUs would need fp16 with loss
    scaling, which CAiD's fp32 losses do not need enough to be worth it; other devices are
    left in fp32). On a CPU this says only that bf16 *may* be faster: pre-training decides
    by measuring (:func:`calibrate_step_settings`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return None


def resolve_mixed_precision(requested: str, device: torch.device | str) -> str:
    """Accelerate's ``mixed_precision`` for a requested setting without measuring:
    ``"auto"`` becomes ``"bf16"`` where :func:`autocast_dtype` says bf16, else ``"no"``;
    anything else (``"no"``, ``"bf16"``, ``"fp16"``) is returned unchanged. (Pre-training
    measures instead where the answer depends on the CPU: :func:`calibrate_step_settings`.)"""
    if requested != "auto":
        return requested
    return "bf16" if autocast_dtype(device) == torch.bfloat16 else "no"


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def use_channels_last(device: torch.device | str) -> bool:
    """Whether to train in channels_last memory format on ``device`` (either precision).

    Yes on CUDA (cuDNN's tensor-core convolutions are NHWC) and on CPUs (oneDNN's
    convolutions are NHWC: contiguous tensors are reordered at every layer). Measured on a
    2-core AVX-512 CPU, ResNet-50 U-Net at 224 px, batch 8: 1.26× the images/s in fp32,
    1.07× in bf16 (ResNet-18 at 128 px: 1.27×, 1.23×). Other devices: no.
    """
    return torch.device(device).type in ("cuda", "cpu")


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert every 4-D parameter and buffer of ``model`` to channels_last, in place, and
    return it. Inputs need no conversion: a convolution with channels_last weights produces
    channels_last outputs, and the rest of the network follows."""
    return model.to(memory_format=torch.channels_last)


def sgd_implementation(device: torch.device | str) -> dict[str, bool]:
    """Keyword arguments picking the fastest ``torch.optim.SGD`` kernel on ``device``:
    ``{"fused": True}`` where torch has a fused SGD for the device (CUDA; CPUs since torch
    2.4): one kernel pass over all parameters, the same numbers as the plain loop. Elsewhere
    ``{"foreach": True}`` on CUDA-like devices and ``{}`` (torch's choice) otherwise.

    On a 2-core AVX-512 CPU (one thread, the 37 M trainable parameters of the ResNet-50
    U-Net + MoCo head) a step took 17 ms fused, 39 ms with the per-parameter loop and 46 ms
    with foreach, which on a CPU is no faster than the loop.
    """
    device = torch.device(device)
    try:
        torch.optim.SGD([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True} if device.type != "cpu" else {}


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on gradient checkpointing of a CAiD model (``CAiDModel``,
    ``CAiDForPreTraining``, …) through transformers, under whichever name the installed
    version has (``activation_checkpointing_enable``, formerly
    ``gradient_checkpointing_enable``), with non-reentrant ``torch.utils.checkpoint``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def compile_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Compile the model's smp encoders and U-Net decoders in place (``Module.compile()``:
    parameter names unchanged) and return the model.

    Only those: they hold almost all the FLOPs, and MoCo's bookkeeping around them (the
    shuffle-BN permutation ``x[torch.randperm(n)]``, the queue) stays eager. Compiling the
    whole pre-training model crashed inductor's pattern matcher on torch 2.11 with CUDA
    ("Not all inputs to pattern found in match.kwargs", pytorch/pytorch#183988, on an H200);
    on torch 2.14.1's CPU inductor it now compiles (``benchmarks/train_step.py --compile
    whole``; MoCo's step with the emulation compiled equals the eager one,
    ``tests/test_performance.py``), not yet measured on a GPU.
    The first steps then take minutes (about 5 on a 2-core CPU). Off by default: on that CPU
    the compiled step was no faster (ResNet-50) or slower (ResNet-18) than the eager one,
    whose time is almost all oneDNN convolutions. With gradient checkpointing, the encoder's
    stages are called one by one and run eagerly. Warns and leaves the model eager where
    inductor cannot work (no C++ compiler for a CPU, or torch without compile support).
    """
    from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
    from segmentation_models_pytorch.encoders._base import EncoderMixin

    try:
        from torch._inductor import cpp_builder

        if torch.device(device).type == "cpu":
            cpp_builder.get_cpp_compiler()
    except Exception as exc:  # no compiler or no inductor: run eagerly
        warnings.warn(f"torch.compile unavailable ({exc}); training eagerly", stacklevel=2)
        return model
    parts = [m for m in model.modules() if isinstance(m, (EncoderMixin, UnetDecoder))]
    for part in parts or [model]:
        part.compile()
    return model


def set_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave torch's default, one per usable core) and
    return the number in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


# Precision and memory format decided by measuring (``--mixed_precision auto``)

CACHE_VARIABLE = "CAID_HF_CACHE"  # folder of the measurements (default: the user's cache)
CALIBRATION_FILE = "step_settings.json"
CALIBRATION_MARGIN = 0.05  # another setting must take 5 % less time per step than the reference
UNSTEADY = 0.2  # one setting's timed steps differing by more: the machine is busy, time more
_CACHE_ENTRIES = 100  # newest measurements kept


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What a training step runs with: Accelerate's ``mixed_precision`` (``"no"`` = fp32,
    ``"bf16"``, ``"fp16"``) and whether the model is in channels_last memory format."""

    mixed_precision: str
    channels_last: bool

    @property
    def label(self) -> str:
        """E.g. ``"bf16, channels_last"`` or ``"fp32, contiguous"``."""
        precision = "fp32" if self.mixed_precision == "no" else self.mixed_precision
        return f"{precision}, {'channels_last' if self.channels_last else 'contiguous'}"

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: fp32)."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)


@dataclasses.dataclass
class StepSettingsChoice:
    """Decided :class:`StepSettings` and how: ``"requested"`` (nothing left to decide),
    ``"known"`` (a GPU: no measuring), ``"measured"`` (timed at this start), ``"cached"``
    (timed at an earlier start of the same model shape on this machine) or ``"recorded"``
    (the choice a resumed run started with). ``ms_per_step``: each candidate's time per
    step as measured (label → ms; empty when nothing was timed); ``seconds``: what deciding
    cost at this start; ``steady``: False when a setting's timed steps still differed by
    more than :data:`UNSTEADY` after the most rounds (a busy machine: measured again at a
    start that finds the machine idle)."""

    settings: StepSettings
    how: str
    ms_per_step: dict[str, float] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    steady: bool = True


def step_setting_candidates(mixed_precision: str, channels_last: bool | None,
                            device: torch.device | str) -> list[StepSettings]:
    """The settings a step on ``device`` may run with, the reference first.

    ``mixed_precision`` ``"auto"`` on a CPU: fp32, and bf16 where :func:`cpu_supports_bf16`;
    on a GPU the one known answer (:func:`resolve_mixed_precision`); anything else as given.
    ``channels_last`` None on a CPU: channels_last and contiguous (only channels_last for
    bf16 asked of a CPU without bf16 instructions); on a GPU :func:`use_channels_last`;
    True/False as given. The reference is fp32 and, where both are candidates,
    channels_last (the setting used before measuring)."""
    device = torch.device(device)
    if mixed_precision == "auto":
        precisions = (["no", "bf16"] if cpu_supports_bf16() else ["no"]) if device.type == "cpu" \
            else [resolve_mixed_precision("auto", device)]
    else:
        precisions = [mixed_precision]
    if channels_last is not None:
        formats = [channels_last]
    elif device.type != "cpu":
        formats = [use_channels_last(device)]
    elif precisions == ["bf16"] and not cpu_supports_bf16():
        formats = [True]  # emulated bf16: contiguous took 8x channels_last's time on AVX2
    else:
        formats = [True, False]
    return [StepSettings(precision, memory) for precision in precisions for memory in formats]


@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """Run a block without moving Python's, NumPy's or torch's global random streams (CPU,
    and CUDA where it is in use): their states are saved before it and set back after."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def time_step_settings(make_step: Callable[[StepSettings], Callable[[], None]],
                       candidates: list[StepSettings], rounds: int = 2, max_rounds: int = 4,
                       drop_above: float = 1 + CALIBRATION_MARGIN + UNSTEADY,
                       agree: Callable[[list], list] | None = None
                       ) -> dict[StepSettings, list[float]]:
    """The seconds of each candidate's timed steps, the arms interleaved.

    ``make_step(settings)`` returns one training step in those settings (forward, backward;
    it must leave the caller's model and random streams alone). Each arm runs one untimed
    warm-up step (kernel choice, allocation), then each round times one step of each arm
    in turn, in alternating order: ``rounds`` rounds, and more (up to ``max_rounds``) while
    an arm's steps differ by over :data:`UNSTEADY` (other jobs slow some steps down). An arm
    over ``drop_above`` x the fastest (each arm's fastest step) is not timed again: beyond
    the margin and the noise allowed, it cannot win (and a cold start on a CPU with four
    candidates times about ten steps instead of twelve). An arm other than the reference (the first) that fails is left out with a
    warning (no steps). ``agree``: with several processes stepping together (their steps
    exchange data), makes every process time the arms the main process times.
    """
    steps = {}
    for index, settings in enumerate(candidates):
        try:
            steps[settings] = make_step(settings)
            steps[settings]()
        except Exception as error:  # noqa: BLE001 - a setting the model cannot run in
            if index == 0:
                raise
            warnings.warn(f"{settings.label} failed a calibration step ({error}); not used",
                          stacklevel=2)
            steps.pop(settings, None)
    times: dict[StepSettings, list[float]] = {settings: [] for settings in candidates}
    live = list(steps)
    for round_index in range(max_rounds):
        for settings in live if round_index % 2 == 0 else live[::-1]:
            start = time.perf_counter()
            steps[settings]()
            times[settings].append(time.perf_counter() - start)
        fastest = min(min(t) for t in times.values() if t)
        live = [s for s in live if min(times[s]) <= drop_above * fastest]
        if round_index + 1 >= rounds and all(_steady(times[s]) for s in live):
            live = []
        if agree is not None:
            live = agree(live)
        if not live:
            break
    return times


def _steady(steps: list[float]) -> bool:
    return len(steps) < 2 or max(steps) <= (1 + UNSTEADY) * min(steps)


def choose_faster(seconds: dict[StepSettings, float],
                  margin: float = CALIBRATION_MARGIN) -> StepSettings:
    """The first setting of ``seconds`` (the reference) unless another's step takes at
    most ``1 - margin`` of its time; then the fastest. The margin keeps a run on the
    reference when the difference is within what a shared machine's noise can make."""
    reference = next(iter(seconds))
    fastest = min(seconds, key=seconds.get)
    return fastest if seconds[fastest] <= (1 - margin) * seconds[reference] else reference


def calibration_cache_dir() -> Path:
    """Where measurements are kept: ``$CAID_HF_CACHE``, else ``$XDG_CACHE_HOME/caid-hf``,
    else ``~/.cache/caid-hf``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "caid-hf"


def calibration_key(shape: dict) -> dict:
    """What a measurement holds for: this machine (CPU model, torch's kernel capability,
    the CPU's AVX-512 and AMX flags, torch's threads), the torch version, and ``shape`` (the
    model, batch and candidates measured)."""
    flags = sorted(flag for flag in cpu_flags() if flag.startswith(("avx512", "amx")))
    return {"cpu": cpu_model_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "flags": flags, "threads": torch.get_num_threads(), "torch": torch.__version__,
            **shape}


def _read_cache(path: Path) -> list[dict]:
    """The entries of a cache file; none when it is missing or unreadable (it is then
    rewritten whole at the next measurement)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    entries = data.get("entries") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _cached(entries: list[dict], key: dict,
            candidates: list[StepSettings]) -> StepSettingsChoice | None:
    for entry in reversed(entries):
        if entry.get("key") != key:
            continue
        try:
            settings = StepSettings(str(entry["mixed_precision"]), bool(entry["channels_last"]))
            ms = {str(k): float(v) for k, v in dict(entry.get("ms_per_step", {})).items()}
        except (KeyError, TypeError, ValueError):
            continue
        if settings in candidates:
            return StepSettingsChoice(settings, "cached", ms, steady=entry.get("steady") is not False)
    return None


def machine_idle() -> bool:
    """Whether the machine looks idle: a 1-minute load average below its usable cores
    (unknown: yes). An unsteady measurement is redone only then; on a machine that stays
    busy, redoing it at every start would cost each start as much again."""
    try:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return os.getloadavg()[0] < (cores or 1)
    except OSError:
        return True


def _write_cache(path: Path, entries: list[dict]) -> None:
    """Replace ``path`` atomically (a temporary file in its folder, then ``os.replace``):
    a reader sees the old file or the new one, never half of one."""
    import tempfile

    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump({"entries": entries[-_CACHE_ENTRIES:]}, file, indent=1)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _cache_lock(folder: Path, timeout: float) -> Iterator[None]:
    """Hold ``folder``'s lock file (``flock``) while measuring, so that runs started together
    measure one after the other (not against each other) and the later ones read the first's
    result. After ``timeout`` seconds of waiting, or without flock, go on unlocked."""
    import fcntl

    try:
        handle = open(folder / ".step_settings.lock", "a", encoding="utf-8")  # noqa: SIM115
    except OSError:  # a read-only cache folder: measure unlocked
        yield
        return
    with handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            except OSError:  # no flock on this file system
                break
        yield  # the lock goes with the file's closing


def calibrate_step_settings(candidates: list[StepSettings],
                            make_step: Callable[[StepSettings], Callable[[], None]],
                            shape: dict, cache_dir: str | Path | None = None, rounds: int = 2,
                            margin: float = CALIBRATION_MARGIN, lock_timeout: float = 300.0,
                            share: Callable[[object], object] | None = None,
                            is_main: bool = True) -> StepSettingsChoice:
    """Choose among ``candidates`` (reference first, see :func:`step_setting_candidates`)
    by timing real steps (:func:`time_step_settings`, :func:`choose_faster`), or reuse the
    choice measured before for the same :func:`calibration_key` (``shape``: the model and
    batch, e.g. encoder, image size, batch size, method).

    Measurements live in ``cache_dir/step_settings.json`` (default
    :func:`calibration_cache_dir`), one entry per key, written atomically under a lock
    file; an unreadable file is ignored and rewritten. A measurement whose steps stayed
    unsteady (a busy machine) is measured again at a start that finds the machine idle
    (:func:`machine_idle`). The timing draws nothing from the
    global random streams (:func:`untouched_rng`). One candidate: returned as requested.

    Several processes whose steps exchange data (MoCo's shuffle across ranks) call this
    together: ``share(value)`` returns the main process's ``value`` on every process
    (``is_main``: this is the main one), which alone reads and writes the cache; they all
    step together, and all return the main process's choice.
    """
    started = time.perf_counter()
    if len(candidates) == 1:
        return StepSettingsChoice(candidates[0], "requested")
    share = share or (lambda value: value)
    key = calibration_key({**shape, "candidates": [c.label for c in candidates]})
    folder = Path(cache_dir) if cache_dir is not None else calibration_cache_dir()
    path: Path | None = folder / CALIBRATION_FILE if is_main else None
    found = share(_usable(_cached(_read_cache(path), key, candidates)) if path else None)
    if found is None:
        lock = contextlib.nullcontext()
        if path is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                lock = _cache_lock(folder, lock_timeout)
            except OSError as error:  # e.g. a read-only home folder
                warnings.warn(f"cannot keep step-settings measurements in {folder} ({error}); "
                              "measuring at every start", stacklevel=2)
                path = None
        with lock:
            # measured by another run while this one waited for the lock?
            found = share(_usable(_cached(_read_cache(path), key, candidates)) if path
                          else None)
            if found is None:
                with untouched_rng():
                    times = time_step_settings(make_step, candidates, rounds, agree=share)
                seconds = {s: min(t) if t else float("inf") for s, t in times.items()}
                ms = {s.label: round(t * 1e3, 1) for s, t in seconds.items()}
                found = share(StepSettingsChoice(choose_faster(seconds, margin), "measured", ms,
                                                 steady=all(map(_steady, times.values()))))
                if path is not None:
                    _remember(path, key, found)
    found.seconds = time.perf_counter() - started
    return found


def _usable(found: StepSettingsChoice | None) -> StepSettingsChoice | None:
    """A cached choice, unless it was unsteady and the machine is idle now (measure again)."""
    return None if found is not None and not found.steady and machine_idle() else found


def _remember(path: Path, key: dict, choice: StepSettingsChoice) -> None:
    """Add (or replace) ``key``'s entry in the cache file ``path``."""
    entry = {"key": key, "mixed_precision": choice.settings.mixed_precision,
             "channels_last": choice.settings.channels_last, "ms_per_step": choice.ms_per_step,
             "steady": choice.steady, "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    entries = [e for e in _read_cache(path) if e.get("key") != key]
    try:
        _write_cache(path, [*entries, entry])
    except OSError as error:
        warnings.warn(f"cannot write {path} ({error}); measuring again at the next start",
                      stacklevel=2)
