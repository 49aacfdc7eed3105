"""The device-resident Fashion-MNIST path (``device_resident=True``) gives the host path's batches.

On CPU both paths run the same transforms on the same tensors with the same seeds, so the images
must be bit-identical (tolerance 0), batch for batch, across epochs, after a mid-epoch resume, and
through a few Lightning training steps (weights equal to fp32 rounding: the same ops in the same
order, so they are expected identical too; 1e-6 leaves room for nothing but summation order).
"""
from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from visionpe.data.device_loader import DeviceBatchLoader, batch_loader, resident
from visionpe.data.fashion_mnist import FMNIST_DIR, FashionMNISTBatches
from visionpe.train import ImageClassificationData, VisionClassifier

pytestmark = pytest.mark.skipif(not Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file(),
                                reason='needs the Debian package dataset-fashion-mnist')


def data(device_resident: bool, **kw) -> ImageClassificationData:
    args = dict(dataset='fashion_mnist', img_size=20, batch_size=16, train_subset=96, val_subset=40,
                test_subset=24, seed=5, scale=(0.5, 1.0), canvas=(1.0, 1.5), hflip=0.5)
    return ImageClassificationData(device_resident=device_resident, **{**args, **kw})


def views(dm: ImageClassificationData, loader, training: bool, n: int | None = None):
    dm.trainer = SimpleNamespace(training=training, global_rank=0, world_size=1,
                                 strategy=SimpleNamespace(root_device=torch.device('cpu')))
    return [dm.on_after_batch_transfer(batch, 0) for batch in itertools.islice(loader, n)]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb)
        assert torch.equal(xa, xb)


def test_same_batches_as_the_host_loader_every_epoch_and_split():
    host, dev = data(False), data(True)
    for dm in (host, dev):
        dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1,
                                     strategy=SimpleNamespace(root_device=torch.device('cpu')))
    lh, ld = host.train_dataloader(), dev.train_dataloader()
    assert isinstance(ld.loader, DeviceBatchLoader) and not isinstance(lh.loader, DeviceBatchLoader)
    firsts = []
    for epoch in (0, 1):
        lh.sampler.set_epoch(epoch)
        ld.sampler.set_epoch(epoch)
        a, b = views(host, lh, True), views(dev, ld, True)
        assert_same(a, b)
        assert a[0][0].shape == (16, 3, 20, 20)
        firsts.append(a[0][0])
    assert not torch.equal(*firsts)  # a new epoch: new order and augmentations, on both paths alike
    for split in ('val_dataloader', 'test_dataloader'):
        assert_same(views(host, getattr(host, split)(), False), views(dev, getattr(dev, split)(), False))


def test_resume_mid_epoch_reads_the_same_batches():
    full = data(True)
    full.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1,
                                   strategy=SimpleNamespace(root_device=torch.device('cpu')))
    loader = full.train_dataloader()
    every = views(full, loader, True)
    views(full, loader, True, n=2)  # stopped after two batches
    state = loader.state_dict()
    resumed = data(True)
    resumed.trainer = full.trainer
    resumed.load_state_dict({'train_loader': state})
    rest = views(resumed, resumed.train_dataloader(), True)
    assert len(rest) == len(every) - 2
    assert_same(rest, every[2:])


def test_resident_moves_once_and_rejects_other_datasets():
    ds = FashionMNISTBatches(torch.zeros(4, 28, 28, dtype=torch.uint8), torch.arange(4))
    images = ds.images
    assert resident(ds, torch.device('cpu')).images is images  # already there: no copy
    with pytest.raises(TypeError, match='no tensor'):
        resident(SimpleNamespace(images=[1]), torch.device('cpu'))
    sampler = [[(2, 0), (1, 0)], [(0, 0)]]
    batches = list(batch_loader(ds, sampler, torch.device('cpu')))
    assert [b['label'].tolist() for b in batches] == [[2, 1], [0]]
    with pytest.raises(ValueError, match='fashion_mnist only'):
        ImageClassificationData(dataset='imagefolder', root='/nonexistent', device_resident=True)
    with pytest.raises(ValueError, match='multi-resolution'):  # not silently trained on the host path
        ImageClassificationData(dataset='fashion_mnist', device_resident=True, multires_sizes=[24, 32])


@pytest.mark.slow
def test_training_steps_equal_the_host_path(tmp_path):
    weights = []
    for device_resident in (False, True):
        dm = data(device_resident, img_size=16)
        pl.seed_everything(0)
        module = VisionClassifier(model_name='vit_rope2d_tiny', model_kwargs=dict(patch_size=4, embed_dim=32, depth=2,
                                                                                  num_heads=4),
                                  num_classes=10, img_size=16, mean=dm.mean, std=dm.std, dataset=dm.dataset,
                                  opt='adamw', lr=2e-3, warmup_epochs=0, seed=3)
        trainer = pl.Trainer(accelerator='cpu', devices=1, max_steps=8, default_root_dir=str(tmp_path), logger=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             enable_checkpointing=False, limit_val_batches=0)
        trainer.fit(module, datamodule=dm)
        weights.append({k: v.detach().clone() for k, v in module.state_dict().items()})
    for k in weights[0]:
        assert (weights[0][k].float() - weights[1][k].float()).abs().max().item() <= 1e-6, k
