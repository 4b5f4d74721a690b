#!/usr/bin/env python
"""CAiD pre-training entry point.

    python scripts/pretrain.py --config configs/demo.yaml
    accelerate launch --multi_gpu --num_processes 8 scripts/pretrain.py --config configs/caid_moco_resnet50.yaml
"""

import sys

from caid_hf.cli import main

if __name__ == "__main__":
    main(["pretrain", *sys.argv[1:]], prog="pretrain.py")
