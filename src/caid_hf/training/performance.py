"""Speed settings of a training step: mixed precision, memory format, optimizer kernels,
gradient checkpointing and compilation, each decided for the device at hand.

The decisions are measured ones (``benchmarks/train_step.py``, figures in
``benchmarks/RESULTS.md``): bf16 autocast only where the hardware computes in bf16
(Ampere+ GPUs; CPUs with AVX-512 BF16 or AMX), otherwise it is slower than fp32. Losses and
MoCo's queue stay fp32 whatever the autocast dtype (the objectives cast to fp32 themselves).
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


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively: torch's kernels are built for AVX-512 here
    (``torch.backends.cpu.get_cpu_capability()``) and the CPU reports ``avx512_bf16`` or
    ``amx_bf16``. Without them oneDNN emulates bf16 and autocast slows training down."""
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


def use_channels_last(device: torch.device | str, dtype: torch.dtype | None) -> bool:
    """Whether to train in channels_last memory format on ``device`` with autocast ``dtype``.

    Yes on CUDA (cuDNN's tensor-core convolutions are NHWC) and with bf16 on a CPU (oneDNN's
    bf16 convolutions are NHWC); fp32 on a CPU too, where oneDNN also prefers NHWC and
    avoids reordering every activation.
    """
    return torch.device(device).type in ("cuda", "cpu")


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert every 4-D parameter and buffer of ``model`` to channels_last, in place, and
    return it. Inputs need no conversion: a convolution with channels_last weights produces
    channels_last outputs, and the rest of the network follows."""
    return model.to(memory_format=torch.channels_last)


def sgd_implementation(device: torch.device | str) -> dict[str, bool]:
    """Keyword arguments picking the fastest ``torch.optim.SGD`` kernel on ``device``:
    ``{"fused": True}`` on CUDA (one kernel for all parameters), ``{"foreach": True}``
    elsewhere (a few multi-tensor ops instead of one Python iteration per parameter)."""
    if torch.device(device).type == "cuda":
        return {"fused": True}
    return {"foreach": True}


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
    """``model.compile()`` in place (parameter names unchanged) and return the model.

    The first steps then take minutes (longer on a small CPU); MoCo's queue bookkeeping
    runs eagerly between compiled graphs. Warns and leaves the model eager where inductor
    cannot work (no C++ compiler for a CPU, or torch without compile support).
    """
    try:
        from torch._inductor import cpp_builder

        if torch.device(device).type == "cpu":
            cpp_builder.get_cpp_compiler()
    except Exception as exc:  # no compiler or no inductor: run eagerly
        warnings.warn(f"torch.compile unavailable ({exc}); training eagerly", stacklevel=2)
        return model
    model.compile()
    return model


def set_cpu_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave torch's default, one per usable core) and
    return the number in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
