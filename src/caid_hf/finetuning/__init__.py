"""Downstream use of CAiD backbones: fine-tuning and frozen-feature evaluation.

- :mod:`.data`: labelled sources (split lists with labels, CSV files, Hugging Face datasets,
  image + mask folders, phantoms) and their torch datasets;
- :mod:`.metrics`: ROC-AUC, Dice and IoU with bootstrap confidence intervals;
- :mod:`.arguments` and :mod:`.finetune`: the Accelerate fine-tuning loop (``caid-hf
  finetune``, ``scripts/finetune.py``) and its YAML + command-line configuration;
- :mod:`.features`: embeddings, k-NN and linear-probe scores and a t-SNE map
  (``caid-hf evaluate-features``);
- :mod:`.model_card`: cards of fine-tuned models with their test metrics.
"""
