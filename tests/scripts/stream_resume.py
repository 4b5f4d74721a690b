"""Run by tests/test_streaming.py under `accelerate launch --num_processes 2`.

The kill-on-request entry point of ``interruptible_pretrain.py``, with every image the
training stream decodes (in this process or its DataLoader workers) logged to
``$CAID_DECODE_LOG/decoded_<rank>.tsv`` as ``epoch<TAB>image id`` lines.
"""

import os
import runpy
from pathlib import Path

from caid_hf.data.hf_sources import HFStreamingSource

log = Path(os.environ["CAID_DECODE_LOG"]) / f"decoded_{os.environ.get('RANK', '0')}.tsv"
_decode = HFStreamingSource.decode


def logged_decode(self, row, image_id):
    if self.world_size > 1:  # the training stream (the validation head is read unsplit)
        with open(log, "a", encoding="utf-8") as file:
            file.write(f"{self.epoch}\t{image_id}\n")
    return _decode(self, row, image_id)


HFStreamingSource.decode = logged_decode
runpy.run_path(str(Path(__file__).with_name("interruptible_pretrain.py")), run_name="__main__")
