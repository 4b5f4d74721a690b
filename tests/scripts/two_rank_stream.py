"""Run by tests/test_streaming.py under `accelerate launch --num_processes 2`.

Trains a few steps on a streaming parquet dataset through the real entry point and dumps
the image ids this rank's training stream yielded.
"""

import json
import os
import sys

from caid_hf.data.hf_sources import HFStreamingSource
from caid_hf.data.streaming import StreamingTwoCrops
from caid_hf.training.pretrain import main

seen = []  # (epoch, image id) of every image this rank's training stream read
epoch = [0]
_iter = HFStreamingSource.iter_items
_set_epoch = StreamingTwoCrops.set_epoch


def recording_iter(self, exclude=frozenset()):
    for image_id, image, position in _iter(self, exclude):
        if self.world_size > 1:  # the training stream (the validation head is read unsplit)
            seen.append((epoch[0], image_id))
        yield image_id, image, position


def recording_set_epoch(self, value):
    epoch[0] = value
    _set_epoch(self, value)


HFStreamingSource.iter_items = recording_iter
StreamingTwoCrops.set_epoch = recording_set_epoch
result = main(sys.argv[1:])
rank = int(os.environ["RANK"])
(result.output_dir / f"seen{rank}.json").write_text(json.dumps(seen))
