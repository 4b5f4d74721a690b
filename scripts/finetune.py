#!/usr/bin/env python
"""CAiD fine-tuning entry point (classification or segmentation).

    python scripts/finetune.py --config configs/finetune_phantoms_classification.yaml --init_from outputs/demo/best
    accelerate launch --multi_gpu --num_processes 4 scripts/finetune.py --config configs/finetune_chestxray14.yaml
"""

import sys

from caid_hf.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]], prog="finetune.py")
