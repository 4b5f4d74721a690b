"""Time full CAiD pre-training steps: the package's fast path against the original's costs.

A step is what the training loop does once the uint8 crops are on the device: batched view
augmentation (ViewAugmenter), forward of CAiDForPreTraining (query U-Net, momentum key
encoder, method loss + reconstruction loss), backward, SGD step, zero_grad. Steps are timed
after warm-up; each mode reports the median.

Modes:
  default   the package's fast path, as CAiDForPreTraining and the training loop run it:
            precision and memory format as ``--mixed_precision auto`` decides them (a
            short measurement of this model and batch: caid_hf.performance), fused SGD,
            foreach momentum update, no decoder on the key view; --compile and
            --gradient-checkpointing optional. With several --precision values (e.g.
            ``--precision auto fp32 bf16``) the arms run in one process, one model each,
            alternating step by step in a random order on the same views, and the line of
            the auto arm says whether it is within 3 % of the faster fixed precision.
  baseline  the original implementation's costs on the same model: fp32, contiguous
            memory, the whole momentum U-Net run on the key view (its decoder's output
            discarded), the momentum update parameter by parameter in a Python loop, and
            SGD one parameter at a time. The extra work is added here, around the model's
            public API; the package itself never does it.
  both      (default) baseline, then default, each in its own process (so peak memory is
            each mode's own), and their images/s ratio.

    python benchmarks/train_step.py --encoder resnet50 --image-size 224 --batch-size 8
    python benchmarks/train_step.py --encoder resnet18 --image-size 128 --batch-size 32
    python benchmarks/train_step.py --encoder resnet50 --image-size 512 --batch-size 2 \\
        --mode default --gradient-checkpointing
    python benchmarks/train_step.py --encoder resnet18 --image-size 128 --batch-size 32 \\
        --mode default --precision auto fp32 bf16 --steps 6

Every run first prints the CPU it ran on (model, torch's kernel capability, whether the CPU
has AVX-512 BF16 and AMX, threads used): bf16 and channels_last are fast on some CPUs and
slow on others, so a figure holds for its kind of CPU only.

Each mode prints one line: images/s, ms/step (median, with min and max, and the process's
CPU time per step: with --threads 1 the cost on one core, which other jobs sharing the
machine barely change, unlike the wall-clock figures), peak memory (CPU:
the process's peak RSS and its rise during the steps, which on a CPU with --precision or
--channels-last auto includes the start-up measurement's two model copies; GPU:
torch.cuda.max_memory_allocated)
and the FLOP rate of one step counted by torch.utils.flop_counter (MFU with --peak-tflops).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

import torch
from torch import nn

from caid_hf import CAiDConfig, CAiDForPreTraining, performance
from caid_hf.data.augment import AugmentationConfig, ViewAugmenter
from caid_hf.objectives.moco import MoCoV2
from caid_hf.training.pretrain import calibration_shape, calibration_steps


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far in MiB (ru_maxrss: KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def add_original_costs(model: CAiDForPreTraining) -> None:
    """Give a MoCo model the original implementation's extra per-step work.

    The original's key encoder is a momentum copy of the whole U-Net: every step it runs
    the copied decoder and head on the key view's features and throws the result away, and
    its momentum update rebuilds every parameter of the copy (decoder included) one by one
    in Python. Here a frozen copy of the decoder and head runs on the momentum encoder's
    output (a forward hook, so per shuffle-BN sub-batch, as the original per device), and
    ``objective.momentum_update`` is replaced by that loop.
    """
    if not isinstance(model.objective, MoCoV2):
        raise ValueError("the baseline mirrors the original MoCo-v2 CAiD; use --method moco_v2")
    objective = model.objective
    key_decoder = copy.deepcopy(model.caid.decoder).requires_grad_(False)
    key_head = copy.deepcopy(model.caid.segmentation_head).requires_grad_(False)
    objective.baseline_key_decoder = nn.ModuleList([key_decoder, key_head])

    def decode_keys(module: nn.Module, inputs: tuple, features: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch.sigmoid(key_head(key_decoder(features)))  # computed, then discarded

    objective.momentum_encoder.register_forward_hook(decode_keys)
    pairs = [
        (objective.momentum_encoder, model.caid.encoder),
        (objective.momentum_projection_head, objective.projection_head),
        (key_decoder, model.caid.decoder),
        (key_head, model.caid.segmentation_head),
    ]

    @torch.no_grad()
    def momentum_update_loop(self, encoder: nn.Module) -> None:
        m = self.momentum
        for key_module, query_module in pairs:
            for key, query in zip(key_module.parameters(), query_module.parameters()):
                key.data = key.data * m + query.data * (1.0 - m)

    objective.momentum_update = types.MethodType(momentum_update_loop, objective)


def model_config(args: argparse.Namespace) -> CAiDConfig:
    return CAiDConfig(encoder_name=args.encoder, image_size=args.image_size,
                      discrimination_method=args.method, queue_size=args.queue_size,
                      shuffle_bn_splits=args.shuffle_bn_splits,
                      context_prediction=not args.id_only)


PRECISIONS = {"auto": "auto", "fp32": "no", "bf16": "bf16"}  # flag -> Accelerate's name
MEMORY_FORMATS = {"auto": None, "on": True, "off": False}


def calibrate(args: argparse.Namespace, precision: str,
              device: torch.device) -> performance.StepSettingsChoice:
    """What pre-training runs with for ``--mixed_precision PRECISION`` and ``--channels_last``
    as given (``auto``: unset), decided as the package decides at start-up: timed on this
    model and batch, in a fresh cache folder unless ``--calibration-cache``."""
    candidates = performance.step_setting_candidates(PRECISIONS[precision],
                                                     MEMORY_FORMATS[args.channels_last], device)
    run = types.SimpleNamespace(per_device_train_batch_size=args.batch_size,
                                gradient_checkpointing=args.gradient_checkpointing)
    data = types.SimpleNamespace(augmentation_config=AugmentationConfig)
    config = model_config(args)
    with tempfile.TemporaryDirectory() as fresh:
        cache = {None: fresh, "user": None}.get(args.calibration_cache, args.calibration_cache)
        return performance.calibrate_step_settings(
            candidates, calibration_steps(config, data, run, device),
            calibration_shape(config, run), cache_dir=cache)


def calibration_line(precision: str, choice: performance.StepSettingsChoice) -> str:
    timings = "; ".join(f"{label}: {ms:.0f} ms" for label, ms in choice.ms_per_step.items())
    return (f"--precision {precision}: {choice.settings.label} ({choice.how}"
            f"{f' in {choice.seconds:.1f} s' if choice.how == 'measured' else ''}"
            f"{'' if choice.steady else ', unsteady steps (a busy machine?)'}"
            f"{f'; per step {timings}' if timings else ''})")


def sub_batch_passes(args: argparse.Namespace) -> None:
    """``--sub-batch-passes``: the emulation's old way, every arm and the calibration alike."""
    if args.sub_batch_passes:
        import caid_hf.objectives.shuffle_bn_emulation as emulation

        emulation._splittable = lambda norms: False


def build(args: argparse.Namespace, mode: str, device: torch.device,
          settings: performance.StepSettings | None = None):
    """(model, optimizer, autocast dtype, channels_last) of a mode, on ``device``; the
    default mode in ``settings``."""
    torch.manual_seed(0)
    model = CAiDForPreTraining(model_config(args)).to(device).train()
    sub_batch_passes(args)
    hyper = {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4}
    params = [p for p in model.parameters() if p.requires_grad]
    if mode == "baseline":
        add_original_costs(model)
        return model, torch.optim.SGD(params, foreach=False, **hyper), None, False
    dtype, channels_last = settings.dtype, settings.channels_last
    if channels_last:
        performance.to_channels_last(model)
    if args.gradient_checkpointing:
        performance.enable_gradient_checkpointing(model)
    optimizer = torch.optim.SGD(params, **hyper, **performance.sgd_implementation(device))
    return model, optimizer, dtype, channels_last


def compile_for(args: argparse.Namespace, model: nn.Module, device: torch.device) -> None:
    """``--compile parts``: the package's ``--torch_compile`` (the smp encoders and U-Net
    decoders); ``--compile whole``: the whole pre-training model, MoCo's shuffle and queue
    included, in one ``Module.compile()``."""
    if args.compile == "parts":
        performance.compile_model(model, device)
    elif args.compile == "whole":
        model.compile()


def count_flops(step) -> float:
    """FLOPs of one call of ``step`` (convolutions and matrix products, forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def run_mode(args: argparse.Namespace, mode: str) -> dict:
    """Build, warm up and time one mode; returns its figures."""
    threads = performance.set_cpu_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # both modes: fixed shapes, so let cuDNN pick its kernels
        torch.backends.cudnn.benchmark = True
    settings = calibration = None
    if mode == "default":
        sub_batch_passes(args)
        calibration = calibrate(args, args.precision[0], device)
        settings = calibration.settings
        print(calibration_line(args.precision[0], calibration), flush=True)
    model, optimizer, dtype, channels_last = build(args, mode, device, settings)
    augmenter = ViewAugmenter(AugmentationConfig(), context_prediction=not args.id_only, seed=0)
    crops = torch.randint(0, 256, (args.batch_size, 2, args.image_size, args.image_size),
                          dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)
    fixed_views = None if args.augment else augmenter(crops)

    def step() -> None:
        views = augmenter(crops) if fixed_views is None else fixed_views
        with performance.autocast(device, dtype):
            out = model(views.query, views.key,
                        labels=None if args.id_only else views.target)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    flops = float("nan")
    if args.count_flops and mode == "default" and args.compile:
        flops = count_flops(step)  # on the eager model: a counter mode and inductor don't mix
    if mode == "default":
        compile_for(args, model, device)
    rss_before = rss_mib()
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if device.type == "cuda":
        memory = f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated"
    else:
        memory = (f"peak RSS {peak_rss_mib():.0f} MiB "
                  f"(+{peak_rss_mib() - rss_before:.0f} MiB over the built model)")
    if args.count_flops and flops != flops:  # not counted before compiling
        flops = count_flops(step)
    median = statistics.median(times)
    result = {
        "mode": mode, "images_per_s": args.batch_size / median, "ms_per_step": median * 1e3,
        "ms_min": min(times) * 1e3, "ms_max": max(times) * 1e3, "memory": memory,
        "cpu_ms_per_step": statistics.median(cpu_times) * 1e3,
        "gflop_per_step": flops / 1e9, "tflops": flops / median / 1e12,
        "precision": "fp32" if dtype is None else str(dtype).removeprefix("torch."),
        "channels_last": channels_last, "threads": threads, "device": str(device),
        "calibration_s": calibration.seconds if calibration else 0.0,
    }
    extras = [f"{result['precision']}", "channels_last" if channels_last else "contiguous",
              f"{threads} threads" if device.type == "cpu" else str(device)]
    if mode == "default":
        extras += [name for name, on in ((f"compiled ({args.compile})", args.compile),
                                         ("grad-ckpt", args.gradient_checkpointing)) if on]
    rate = (f"{result['gflop_per_step']:.0f} GFLOP/step, {result['tflops']:.3f} TFLOP/s"
            if args.count_flops else "")
    if args.count_flops and args.peak_tflops:
        rate += f" (MFU {result['tflops'] / args.peak_tflops:.1%})"
    print(f"{mode:8s} {args.encoder} {args.image_size}px batch {args.batch_size}: "
          f"{result['images_per_s']:.2f} images/s, {median * 1e3:.0f} ms/step "
          f"(min {result['ms_min']:.0f}, max {result['ms_max']:.0f}, {args.steps} steps; "
          f"process CPU {result['cpu_ms_per_step']:.0f} ms/step), "
          f"{memory}, {rate + ', ' if rate else ''}[{', '.join(extras)}]", flush=True)
    return result


def run_in_child(argv: list[str], mode: str) -> dict:
    """Run one mode in a fresh process (its own peak memory); its line goes to our stdout."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--mode", mode,
                        "--result-file", result_file], check=True)
        with open(result_file) as f:
            return json.load(f)


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per mode (median).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    parser.add_argument("--mode", choices=["default", "baseline", "both", "splits",
                                           "splits-paired"],
                        default="both",
                        help="'splits': the default mode with --shuffle-bn-splits 1 against "
                             "the given splits (the one-process shuffle-BN emulation's cost), "
                             "each arm a fresh process; 'splits-paired': the same arms in one "
                             "process and one model, alternating step by step in a random "
                             "order (less exposed to a shared machine's drift).")
    parser.add_argument("--shuffle-bn-splits", type=int, default=2,
                        help="Sub-batches of the one-process shuffle-BN emulation (MoCo).")
    parser.add_argument("--sub-batch-passes", action="store_true",
                        help="Emulate shuffle-BN the old way: the encoders and the decoder "
                             "run once per sub-batch (for comparison with the one pass).")
    parser.add_argument("--id-only", action="store_true",
                        help="Instance discrimination only (no decoder, no reconstruction).")
    parser.add_argument("--method", choices=["moco_v2", "barlow_twins", "simsiam"],
                        default="moco_v2", help="Objective (the baseline needs moco_v2).")
    parser.add_argument("--queue-size", type=int, default=65536)
    parser.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["auto"],
                        help="Default mode's precision, as --mixed_precision: auto (measured "
                             "at start-up, as pre-training does), fp32 or bf16. Several "
                             "values: one interleaved arm each, in one process.")
    parser.add_argument("--channels-last", choices=list(MEMORY_FORMATS), default="auto",
                        help="Default mode's memory format: auto (as pre-training with "
                             "--channels_last unset: measured on a CPU), on or off.")
    parser.add_argument("--calibration-cache", default=None,
                        help="Folder of the measurements behind auto (default: a fresh one, "
                             "so each run measures; 'user': the cache pre-training uses).")
    parser.add_argument("--compile", nargs="?", const="parts", choices=["parts", "whole"],
                        default=None,
                        help="Default mode: compile the encoders and decoders ('parts', as "
                             "--torch_compile trains; the flag alone) or the whole model "
                             "('whole'). FLOPs (--count-flops) are counted on the eager "
                             "step first.")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="Default mode: checkpoint encoder stages and decoder blocks.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads.")
    parser.add_argument("--no-augment", dest="augment", action="store_false",
                        help="Leave the view augmentation out of the timed step.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="With --mode both: alternate baseline/default this many times "
                             "(each a fresh process) and report the median of each.")
    parser.add_argument("--count-flops", action="store_true",
                        help="Count one step's FLOPs (an extra untimed step) and print TFLOP/s.")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="The device's peak TFLOP/s in the step's precision, for MFU.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present).")
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def compare_splits(argv: list[str], args: argparse.Namespace) -> None:
    """The default mode with ``--shuffle-bn-splits 1``, with the given splits in one pass
    and with the given splits as one pass per sub-batch (the emulation before the split
    BatchNorm), interleaved ``--rounds`` times in fresh processes; prints the medians and
    the cost of each emulation against no emulation."""
    child_argv = without_option(without_option(argv, "--mode"), "--shuffle-bn-splits")
    child_argv = [a for a in child_argv if a != "--sub-batch-passes"]
    splits = str(args.shuffle_bn_splits)
    arms = {"shuffle_bn_splits=1": ["--shuffle-bn-splits", "1"],
            f"shuffle_bn_splits={splits}, one pass": ["--shuffle-bn-splits", splits],
            f"shuffle_bn_splits={splits}, a pass per sub-batch": ["--shuffle-bn-splits", splits,
                                                                  "--sub-batch-passes"]}
    runs: dict[str, list] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, extra in arms.items():
            runs[name].append(run_in_child(child_argv + extra, "default"))
    rate = {n: statistics.median(r["images_per_s"] for r in rs) for n, rs in runs.items()}
    cpu = {n: statistics.median(r["cpu_ms_per_step"] for r in rs) for n, rs in runs.items()}
    plain = "shuffle_bn_splits=1"
    print(f"{'ID-only' if args.id_only else 'CAiD'} {args.method}, {args.encoder} "
          f"{args.image_size}px batch {args.batch_size}"
          f"{f', medians of {args.rounds} interleaved rounds' if args.rounds > 1 else ''}:")
    for name in arms:
        slower = 1 - rate[name] / rate[plain]
        cost = "" if name == plain else (
            f": {abs(slower):.1%} {'slower' if slower >= 0 else 'faster'}, CPU time "
            f"{cpu[name] / cpu[plain] - 1:+.1%}")
        print(f"  {name:45s} {rate[name]:6.2f} images/s, {cpu[name]:5.0f} ms CPU/step{cost}")


def paired_splits(args: argparse.Namespace) -> None:
    """:func:`compare_splits`'s arms, and the emulation with the query branch too in one
    pass (:func:`caid_hf.objectives.shuffle_bn_emulation.query_in_one_pass` forced), on one model in one
    process: every round augments one batch of views (untimed) and times one step of each
    arm on them, in a random order; prints each arm's median and the median of its per-round step-time ratio
    to ``shuffle_bn_splits=1``, with a bootstrap 95 % interval (``--steps`` rounds).

    The same views in every arm of a round take the augmentation's own spread out of the
    ratios, and leaving its time out makes each ratio stricter (a smaller denominator)."""
    import caid_hf.objectives.shuffle_bn_emulation as emulation

    threads = performance.set_cpu_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    splits = args.shuffle_bn_splits
    args.shuffle_bn_splits, args.sub_batch_passes = splits, False
    settings = calibrate(args, args.precision[0], device).settings
    model, optimizer, dtype, _ = build(args, "default", device, settings)
    augmenter = ViewAugmenter(AugmentationConfig(), context_prediction=not args.id_only, seed=0)
    crops = torch.randint(0, 256, (args.batch_size, 2, args.image_size, args.image_size),
                          dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)
    splittable, policy = emulation._splittable, emulation.query_in_one_pass
    always, never = (lambda x: True), (lambda norms: False)
    # (splits, _splittable, query_in_one_pass) of each arm
    arms = {"shuffle_bn_splits=1": (1, splittable, policy),
            f"shuffle_bn_splits={splits}, as the package runs it": (splits, splittable, policy),
            f"shuffle_bn_splits={splits}, all in one pass": (splits, splittable, always),
            f"shuffle_bn_splits={splits}, a pass per sub-batch": (splits, never, policy)}

    def step(arm: str, views) -> float:
        (model.objective.shuffle_bn_splits, emulation._splittable,
         emulation.query_in_one_pass) = arms[arm]
        start = time.perf_counter()
        with performance.autocast(device, dtype):
            out = model(views.query, views.key, labels=None if args.id_only else views.target)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        views = augmenter(crops)
        for arm in arms:
            step(arm, views)
    order, times = random.Random(0), {arm: [] for arm in arms}
    for _ in range(args.steps):
        views = augmenter(crops)
        for arm in order.sample(list(arms), len(arms)):
            times[arm].append(step(arm, views))
    emulation._splittable, emulation.query_in_one_pass = splittable, policy
    plain = "shuffle_bn_splits=1"
    where = (f"{threads} threads" if device.type == "cpu" else
             f"{device}, peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB "
             "allocated over all arms")
    print(f"{'ID-only' if args.id_only else 'CAiD'} {args.method}, {args.encoder} "
          f"{args.image_size}px batch {args.batch_size}, {args.steps} paired rounds in one "
          f"process ({where}; the views' augmentation untimed):")
    for arm in arms:
        rate = args.batch_size / statistics.median(times[arm])
        ratios = [t / u for t, u in zip(times[arm], times[plain])]
        ratio = statistics.median(ratios)
        low, high = bootstrap_interval(ratios)
        cost = "" if arm == plain else (
            f": median step time ratio {ratio:.3f} ({abs(ratio - 1):.1%} "
            f"{'slower' if ratio >= 1 else 'faster'}; 95 % interval {low:.3f}–{high:.3f})")
        print(f"  {arm:45s} {rate:6.2f} images/s{cost}")


def fixed_arm_settings(args: argparse.Namespace, precision: str, device: torch.device,
                       auto: performance.StepSettingsChoice) -> performance.StepSettings:
    """The settings of a ``--precision fp32|bf16`` arm: its memory format as pre-training
    would choose it for ``--mixed_precision`` that precision, taken from the auto arm's
    measurement where it timed both formats in that precision (else measured for it)."""
    name = PRECISIONS[precision]
    pair = [performance.StepSettings(name, memory) for memory in (True, False)]
    if args.channels_last == "auto" and all(s.label in auto.ms_per_step for s in pair):
        return performance.choose_faster({s: auto.ms_per_step[s.label] for s in pair})
    return calibrate(args, precision, device).settings


def compare_precisions(args: argparse.Namespace) -> None:
    """The default mode in each ``--precision`` (several values), one model and optimizer
    per arm in one process: every round augments one batch of views (untimed) and times one
    step of each arm on them, in a random order (``--warmup`` untimed rounds first). Prints
    each arm's median images/s and step time, and the auto arm against the faster of the
    fixed precisions: the ratio of the medians and the median of the per-round step-time
    ratios with a bootstrap 95 % interval, and whether auto is within 3 %."""
    threads = performance.set_cpu_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sub_batch_passes(args)
    auto = calibrate(args, "auto", device)
    print(calibration_line("auto", auto), flush=True)
    arms = {}
    for precision in dict.fromkeys(args.precision):
        settings = (auto.settings if precision == "auto"
                    else fixed_arm_settings(args, precision, device, auto))
        arms[f"{precision} ({settings.label})"] = build(args, "default", device, settings)
    augmenter = ViewAugmenter(AugmentationConfig(), context_prediction=not args.id_only, seed=0)
    crops = torch.randint(0, 256, (args.batch_size, 2, args.image_size, args.image_size),
                          dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)

    def step(arm: str, views) -> float:
        model, optimizer, dtype, _ = arms[arm]
        start = time.perf_counter()
        with performance.autocast(device, dtype):
            out = model(views.query, views.key, labels=None if args.id_only else views.target)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(args.warmup):
        views = augmenter(crops)
        for arm in arms:
            step(arm, views)
    order, times = random.Random(0), {arm: [] for arm in arms}
    for _ in range(args.steps):
        views = augmenter(crops)
        for arm in order.sample(list(arms), len(arms)):
            times[arm].append(step(arm, views))
    where = f"{threads} threads" if device.type == "cpu" else str(device)
    print(f"{'ID-only' if args.id_only else 'CAiD'} {args.method}, {args.encoder} "
          f"{args.image_size}px batch {args.batch_size}, {args.steps} interleaved rounds in one "
          f"process ({where}; the views' augmentation untimed):")
    rate = {arm: args.batch_size / statistics.median(t) for arm, t in times.items()}
    for arm, t in times.items():
        print(f"  {arm:32s} {rate[arm]:6.2f} images/s, {statistics.median(t) * 1e3:6.0f} ms/step "
              f"(min {min(t) * 1e3:.0f}, max {max(t) * 1e3:.0f})")
    auto_arm = next((arm for arm in arms if arm.startswith("auto ")), None)
    fixed = [arm for arm in arms if not arm.startswith("auto ")]
    if auto_arm and fixed:
        best = max(fixed, key=rate.get)
        ratios = [a / b for a, b in zip(times[auto_arm], times[best])]
        low, high = bootstrap_interval(ratios)
        share = rate[auto_arm] / rate[best]
        print(f"auto / faster fixed arm {best}: {share:.3f}x the images/s (medians); median "
              f"per-round step-time ratio {statistics.median(ratios):.3f} (95 % interval "
              f"{low:.3f}-{high:.3f}); auto within 3 % of it: {'yes' if share >= 0.97 else 'NO'}")


def bootstrap_interval(values: list[float], resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of the median of ``values`` resampled with
    replacement (a percentile bootstrap interval of the median)."""
    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(values, k=len(values)))
                     for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.result_file:  # (a child run of --mode both/splits: its parent said it)
        threads = performance.set_cpu_threads(args.threads)
        print(f"CPU: {performance.describe_cpu(threads)}", flush=True)
    if len(args.precision) > 1 and args.mode != "default":
        raise SystemExit("several --precision values are arms of --mode default only")
    if len(args.precision) > 1:
        compare_precisions(args)
        return
    if args.mode == "splits":
        compare_splits(argv, args)
        return
    if args.mode == "splits-paired":
        paired_splits(args)
        return
    if args.mode != "both":
        result = run_mode(args, args.mode)
        if args.result_file:
            with open(args.result_file, "w") as f:
                json.dump(result, f)
        return
    child_argv = without_option(argv, "--mode")
    runs = {"baseline": [], "default": []}
    for _ in range(args.rounds):
        for mode in runs:
            runs[mode].append(run_in_child(child_argv, mode))
    baseline, default = ({key: statistics.median(r[key] for r in runs[m])
                          for key in ("images_per_s", "cpu_ms_per_step")}
                         for m in ("baseline", "default"))
    print(f"ratio default/baseline: {default['images_per_s'] / baseline['images_per_s']:.2f}x "
          f"({default['images_per_s']:.2f} vs {baseline['images_per_s']:.2f} images per second"
          f"{f', medians of {args.rounds} rounds' if args.rounds > 1 else ''}); "
          f"process CPU time per step {baseline['cpu_ms_per_step'] / default['cpu_ms_per_step']:.2f}x "
          f"less")


if __name__ == "__main__":
    main()
