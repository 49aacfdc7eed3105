"""Wall time of one training epoch: fixed-size batches vs multi-resolution batches at equal tokens per batch.

The Fashion-MNIST recipe (configs/fmnist_vit_tiny.yaml: ViT 64-d, depth 4, patch 4, 32 px, batch 64) on a fixed
training subset, one epoch without validation, against the same recipe with configs/fmnist_vit_tiny_multires.yaml's
batches (24..40 px in steps of 4, batch 64 x (32 / size)^2). The runs alternate (fixed, multires, fixed, ...) so
that load changes on a shared machine hit both. Prints per-epoch seconds, the ratio, and seconds per 1k tokens.

    python benchmarks/multires_cost.py --model vit_ape_tiny --subset 3200 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import yaml
from lightning.pytorch.callbacks import Callback

from visionpe.train import ImageClassificationData, VisionClassifier

ROOT = Path(__file__).resolve().parents[1]


class EpochClock(Callback):
    def __init__(self) -> None:
        self.seconds, self.tokens, self.batches = 0.0, 0, 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        x = batch[0]
        p = pl_module.model.patch_embed.patch_size
        self.tokens += x.shape[0] * (x.shape[-2] // p[0]) * (x.shape[-1] // p[1])
        self.batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self._t0


def run(config: str, model: str, subset: int) -> EpochClock:
    cfg = yaml.safe_load((ROOT / 'configs' / config).read_text())
    data = {k: v for k, v in cfg['data'].items()}
    kwargs = dict(cfg['model']['model_kwargs'], dynamic_img_size=True)
    pl.seed_everything(0, verbose=False)
    dm = ImageClassificationData(**{**data, 'train_subset': subset, 'val_subset': 64})
    hp = {k: v for k, v in cfg['model'].items() if k not in ('model_name', 'model_kwargs')}
    module = VisionClassifier(model_name=model, model_kwargs=kwargs, num_classes=10, img_size=dm.img_size,
                              mean=dm.mean, std=dm.std, dataset=dm.dataset, **hp)
    clock = EpochClock()
    trainer = pl.Trainer(accelerator='cpu', devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(module, dm)
    return clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', default='vit_ape_tiny')
    ap.add_argument('--subset', type=int, default=3200, help='training images per epoch')
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--out', default=None, help='write the results as JSON here')
    args = ap.parse_args()
    rows = []
    for r in range(args.repeats):
        for name, config in (('fixed', 'fmnist_vit_tiny.yaml'), ('multires', 'fmnist_vit_tiny_multires.yaml')):
            c = run(config, args.model, args.subset)
            rows.append(dict(recipe=name, repeat=r, seconds=c.seconds, batches=c.batches, tokens=c.tokens,
                             ms_per_1k_tokens=1e3 * c.seconds / (c.tokens / 1e3)))
            print(json.dumps(rows[-1]), flush=True)
    mean = {n: sum(x['seconds'] for x in rows if x['recipe'] == n) / args.repeats for n in ('fixed', 'multires')}
    per_tok = {n: sum(x['ms_per_1k_tokens'] for x in rows if x['recipe'] == n) / args.repeats
               for n in ('fixed', 'multires')}
    summary = dict(model=args.model, subset=args.subset, epoch_seconds=mean,
                   epoch_ratio=mean['multires'] / mean['fixed'], per_token_ratio=per_tok['multires'] / per_tok['fixed'])
    print(json.dumps(summary))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(rows=rows, summary=summary), indent=1))


if __name__ == '__main__':
    main()
