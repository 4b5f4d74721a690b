"""Run by tests/test_training.py under `accelerate launch --num_processes 2`.

Trains a few steps through the real entry point, recording the local keys each rank hands
to the queue, then dumps every rank's final state so the test can compare them.
"""

import os
import sys

import torch

from caid_hf.data.crops import TwoCropDataset
from caid_hf.objectives.moco import MoCoV2
from caid_hf.training.pretrain import main

enqueued = []  # (objective, keys): a first start on a machine also steps a calibration model
_enqueue = MoCoV2.enqueue


def recording_enqueue(self, keys):
    enqueued.append((self, keys.detach().cpu().clone()))  # kept alive: ids are not reused
    _enqueue(self, keys)


MoCoV2.enqueue = recording_enqueue

train_indices = []
_crops = TwoCropDataset.crops


def recording_crops(self, i, boxes_of=None):
    if self.per_epoch:  # training crops (validation crops are the same every epoch)
        train_indices.append(i)
    return _crops(self, i, boxes_of)


TwoCropDataset.crops = recording_crops
result = main(sys.argv[1:])
model = result.model
local_keys = [keys for objective, keys in enqueued if objective is model.objective]
rank = int(os.environ["RANK"])  # the process group is gone after end_training()
torch.save(
    {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"]),
     "state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
     "parameters": [n for n, _ in model.named_parameters()],
     "local_keys": local_keys, "train_indices": train_indices},
    result.output_dir / f"rank{rank}.pt",
)
