#!/usr/bin/env python
"""Train a visionpe / timm model with Lightning (LightningCLI: fit | validate | test | predict).

    python train.py                                   # default: fit configs/fmnist_vit_tiny.yaml (CPU)
    python train.py --trainer.max_epochs 3            # no subcommand: the default run with overrides
    python train.py fit --config configs/fmnist_vit_tiny.yaml --model.model_name vit_rope2d_mixed_tiny
    python train.py fit --config configs/vit_small_in1k_deit3.yaml --model.model_name vit_rope2d_small --data.root /data/imagenet
    python train.py fit --config configs/fmnist_vit_tiny.yaml --print_config
"""
from visionpe.train.cli import main

if __name__ == '__main__':
    main()
