"""Run by tests/test_barlow_twins.py and tests/test_simsiam.py (not by pytest itself).

    python tests/scripts/global_batch_check.py METHOD RECONSTRUCT_VIEWS DTYPE OUT_DIR

One training step of a tiny CAiDForPreTraining (in DTYPE, float32 or float64), twice from
the same weights and images:
in this process on the whole batch of 8 (``reference.pt``), then in two gloo processes
under DistributedDataParallel, each on its half of the batch (``rank0.pt``, ``rank1.pt``).
Each file holds the losses, every parameter's gradient (after DDP's averaging) and every
BatchNorm running statistic after the step; the test compares them.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from caid_hf import CAiDConfig, CAiDForPreTraining

BATCH, WORLD = 8, 2


def build(method: str, reconstruct_views: str, dtype: str) -> CAiDForPreTraining:
    config = CAiDConfig(encoder_name="resnet18", image_size=64, discrimination_method=method,
                        reconstruct_views=reconstruct_views, barlow_projector_dims=[32, 32, 32],
                        simsiam_projector_dims=[32, 32, 32], simsiam_predictor_hidden_dim=8)
    return CAiDForPreTraining(config).to(getattr(torch, dtype)).train()


def inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shapes = [(BATCH, 3, 64, 64)] * 2 + [(BATCH, 1, 64, 64)] * 2
    return tuple(torch.rand(shape, generator=g, dtype=dtype) for shape in shapes)


def step(model, module, part: slice) -> dict:
    """Forward + backward on ``inputs()[part]``; ``module`` is the model or its DDP wrapper."""
    q, k, target, key_target = (x[part] for x in inputs(model.dtype))
    out = module(q, k, labels=target, key_labels=key_target)
    out.loss.backward()
    return {
        "loss": out.loss.detach(), "contrastive_loss": out.contrastive_loss.detach(),
        "reconstruction_loss": out.reconstruction_loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "running": {n: b.clone() for n, b in model.named_buffers() if "running" in n},
    }


def worker(rank: int, method: str, reconstruct_views: str, dtype: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=WORLD)
    model = build(method, reconstruct_views, dtype)
    model.load_state_dict(torch.load(Path(out_dir) / "initial.pt"))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    half = BATCH // WORLD
    result = step(model, ddp, slice(rank * half, (rank + 1) * half))
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def main(method: str, reconstruct_views: str, dtype: str, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = build(method, reconstruct_views, dtype)
    torch.save(model.state_dict(), Path(out_dir) / "initial.pt")
    torch.save(step(model, model, slice(None)), Path(out_dir) / "reference.pt")
    mp.spawn(worker, args=(method, reconstruct_views, dtype, out_dir), nprocs=WORLD)


if __name__ == "__main__":
    main(*sys.argv[1:5])
