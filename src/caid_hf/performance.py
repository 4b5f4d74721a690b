"""Speed settings of a training step: mixed precision, memory format, optimizer kernels,
gradient checkpointing and compilation, each decided for the device at hand.

Measured with ``benchmarks/train_step.py`` (figures in ``benchmarks/RESULTS.md``): on a
2-core AVX-512 BF16 CPU, bf16 autocast and channels_last made a CAiD step 2.5–3× cheaper
than the original's fp32 step. bf16 is chosen only where the hardware has bf16 arithmetic
(Ampere+ GPUs; CPUs with AVX-512 BF16 or AMX); elsewhere training stays fp32. Losses and
MoCo's queue stay fp32 whatever the autocast dtype (the objectives cast to fp32 themselves).

In an Accelerate loop, autocast comes from ``Accelerator(mixed_precision=...)`` (see
:func:`resolve_mixed_precision`), which also works on a CPU; :func:`autocast` is for code
that runs the model without Accelerate (benchmarks, evaluation scripts).
"""

from __future__ import annotations

import contextlib
import warnings
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
    import os

    flags = cpu_flags(cpuinfo)
    threads = torch.get_num_threads() if threads is None else threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in _CPU_BF16_FLAGS)
    return (f"{cpu_model_name(cpuinfo)}; torch kernels {torch.backends.cpu.get_cpu_capability()}; "
            f"{bf16}; {threads} thread{'s' if threads != 1 else ''} of {cores} cores")


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively: torch's kernels are built for AVX-512 here
    (``torch.backends.cpu.get_cpu_capability()``) and the CPU reports ``avx512_bf16`` or
    ``amx_bf16``. Without them there is no bf16 arithmetic to gain from, so training
    stays fp32 (that case is not measured here)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability and "AMX" not in capability:
        return False
    return any(flag in cpu_flags() for flag in _CPU_BF16_FLAGS)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a training step should use on ``device``, or None for fp32.

    bf16 on CUDA GPUs of compute capability 8.0 or newer (Ampere, Hopper, …) and on CPUs
    where :func:`cpu_supports_bf16`; None elsewhere (older GPUs would need fp16 with loss
    scaling, which CAiD's fp32 losses do not need enough to be worth it; other devices are
    left in fp32).
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    return None


def resolve_mixed_precision(requested: str, device: torch.device | str) -> str:
    """Accelerate's ``mixed_precision`` for a requested setting: ``"auto"`` becomes
    ``"bf16"`` where :func:`autocast_dtype` says bf16, else ``"no"``; anything else
    (``"no"``, ``"bf16"``, ``"fp16"``) is returned unchanged."""
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
