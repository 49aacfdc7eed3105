#!/usr/bin/env python
"""Train a visionpe / timm model with Lightning (LightningCLI: fit | validate | test | predict).

    python train.py                                   # default: Fashion-MNIST ViT, CPU, minutes
    python train.py fit --config configs/fmnist_vit_tiny.yaml --model.model_name vit_rope2d_mixed_tiny
    python train.py fit --config configs/vit_rope2d_small_in1k.yaml --data.root /data/imagenet
    python train.py fit --config configs/fmnist_vit_tiny.yaml --print_config
"""
from visionpe.train.cli import main

if __name__ == '__main__':
    main()
