"""Multi-resolution training batches: the schedule (token budget, uniform / progressive, the same on every
rank), few-step fits of a ViT and a hierarchical model, an exact mid-epoch resume, and DDP on 2 CPU processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import visionpe
from visionpe.data.fashion_mnist import FMNIST_DIR
from visionpe.data.multires import MultiResolution
from visionpe.train import ImageClassificationData, VisionClassifier

ROOT = Path(__file__).resolve().parents[1]
HAVE_FMNIST = Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason='needs the Debian package dataset-fashion-mnist')
VIT_TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.1, dynamic_img_size=True)
SWIN = 'swin_rope2d_tiny' if 'swin_rope2d_tiny' in visionpe.list_models() else 'swin_tiny_patch4_window7_224'
SWIN_TINY = dict(patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=2, dynamic_img_size=True)


# ----------------------------------------------------------------------------------- the schedule
def test_token_budget_and_rank_schedules():
    mr = MultiResolution.from_options(None, (24, 40), 8, img_size=32, batch_size=64)
    assert mr.sizes == (24, 32, 40) and mr.batch_sizes == (114, 64, 40)
    for s, b in zip(mr.sizes, mr.batch_sizes):  # tokens per batch within 3% of 32^2 x 64
        assert abs(s * s * b / (32 * 32 * 64) - 1) < 0.03
    ranks = [mr.batch_sampler(6000, seed=5, rank=r, world_size=2) for r in range(2)]
    for epoch in range(3):
        for bs in ranks:
            bs.set_epoch(epoch)
        seqs = [bs.sizes_of_epoch(epoch) for bs in ranks]
        assert seqs[0] == seqs[1]  # every rank draws the same sizes in the same order
        batches = [list(bs) for bs in ranks]
        assert [[c for _, c in b[:1]] for b in batches[0]] == [[c for _, c in b[:1]] for b in batches[1]]
        idx = [{i for b in bb for (i, _), _ in b} for bb in batches]
        assert not idx[0] & idx[1]  # ranks read disjoint samples
        assert all(len(b) == mr.batch_sizes[b[0][1]] for bb in batches for b in bb)
    assert ranks[0].sizes_of_epoch(0) != ranks[0].sizes_of_epoch(1)  # reshuffled per epoch
    # uniform: each size about a third of the batches
    counts = torch.bincount(torch.tensor(ranks[0].sizes_of_epoch(0)), minlength=3).float()
    assert (counts / counts.sum() - 1 / 3).abs().max() < 0.12
    # resume offset: the same batches from batch 5 on
    bs = ranks[0]
    bs.set_epoch(1)
    full = list(bs)
    bs.start_batch = 5
    it = iter(bs)
    bs.start_batch = 0  # the loader resets it once iteration has started; the offset was read already
    assert list(it) == full[5:]


def test_progressive_schedule_and_errors():
    mr = MultiResolution.from_options([16, 24, 32, 40], None, 8, img_size=32, batch_size=64,
                                      schedule='progressive', schedule_epochs=4)
    bs = mr.batch_sampler(4000, seed=0, rank=0, world_size=1)
    means = [sum(mr.sizes[c] for c in bs.sizes_of_epoch(e)) / len(bs) for e in range(4)]
    assert means == sorted(means) and means[0] < 24 < 32 < means[-1]
    with pytest.raises(ValueError, match='schedule_epochs'):
        MultiResolution.from_options([16, 32], None, 8, img_size=32, batch_size=8, schedule='progressive')
    with pytest.raises(ValueError, match='not both'):
        MultiResolution.from_options([16], (16, 32), 8, img_size=32, batch_size=8)
    with pytest.raises(ValueError, match='multires_schedule must be'):
        MultiResolution.from_options([16], None, 8, img_size=32, batch_size=8, schedule='random')
    with pytest.raises(ValueError, match='map-style'):
        ImageClassificationData(dataset='webdataset', num_classes=10, train_samples=10, multires_sizes=[16, 24])


def test_scheduled_image_folder_transforms_per_size_and_skips_bad(tmp_path):
    """imagefolder items through timm's ScheduledTransformDataset: the batch's size choice picks the transform,
    the per-sample seed makes it repeatable, an unreadable image stays None for collate_skip_bad."""
    import torchvision.transforms as T
    from test_data import make_image_folder
    from visionpe.data import SafeImageFolder, collate_skip_bad
    from visionpe.data.multires import ScheduledTransformSkipBad
    root = make_image_folder(tmp_path, per_class=2, corrupt=1)
    ds = ScheduledTransformSkipBad(SafeImageFolder(root / 'train'), [
        T.Compose([T.RandomResizedCrop(s), T.ToTensor()]) for s in (8, 12)])
    items = [ds[((i, 99), 1)] for i in range(len(ds.dataset))]
    batch = collate_skip_bad(items)
    assert int(batch['n_bad']) == 1 and batch['image'].shape == (4, 3, 12, 12)
    assert ds[((0, 99), 0)][0].shape == (3, 8, 8)
    assert torch.equal(ds[((0, 5), 0)][0], ds[((0, 5), 0)][0])
    with pytest.raises(IndexError, match='out of range'):
        ds[((0, 5), 2)]


# ----------------------------------------------------------------------------------- fits
class RecordShapes(Callback):
    def __init__(self):
        self.train, self.val = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train[trainer.global_step] = tuple(batch[0].shape)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(tuple(batch[0].shape))


class Crash(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError('simulated crash')


def _fit(tmp: Path, name: str, kwargs: dict, max_steps: int, extra=(), ckpt_path=None, warmup_epochs=0.25, **data):
    pl.seed_everything(0, verbose=False)
    dm = ImageClassificationData(**{**dict(img_size=16, batch_size=16, train_subset=160, val_subset=32,
                                           test_subset=32, seed=7, multires_sizes=[12, 16, 20]), **data})
    module = VisionClassifier(model_name=name, model_kwargs=kwargs, num_classes=10, img_size=16, mean=dm.mean,
                              std=dm.std, dataset=dm.dataset, lr=2e-3, warmup_epochs=warmup_epochs, min_lr=1e-4,
                              mixup=0.8, cutmix=1.0, seed=3)
    rec = RecordShapes()
    ckpt = ModelCheckpoint(dirpath=str(tmp / 'ckpt'), every_n_train_steps=2, save_top_k=-1, save_last=True)
    tr = pl.Trainer(accelerator='cpu', devices=1, max_steps=max_steps, default_root_dir=str(tmp), logger=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    val_check_interval=4, limit_val_batches=1, callbacks=[rec, *extra, ckpt])
    tr.fit(module, dm, ckpt_path=ckpt_path)
    return module, tr, rec


@needs_fmnist
@pytest.mark.slow
def test_multires_fit_and_exact_mid_epoch_resume(tmp_path):
    """A crash at step 5 (mid-epoch: 160 samples make ~9 batches) and a resume from the step-4 checkpoint
    give the uninterrupted run's batch shapes and weights; validation runs at the nominal 16 px."""
    ref, tr, rec = _fit(tmp_path / 'ref', 'vit_rope2d_tiny', VIT_TINY, 7)
    assert tr.num_training_batches > 7  # the crash and the resume happen inside epoch 0
    assert {s[-1] for s in rec.train.values()} == {12, 16, 20}
    assert {(s[-1], s[0]) for s in rec.train.values()} <= {(12, 28), (16, 16), (20, 10)}  # tokens ~ constant
    assert rec.val and all(s[-2:] == (16, 16) for s in rec.val)
    run = tmp_path / 'run'
    with pytest.raises(RuntimeError, match='simulated'):
        _fit(run, 'vit_rope2d_tiny', VIT_TINY, 7, extra=[Crash(5)])
    resumed, tr2, rec2 = _fit(run, 'vit_rope2d_tiny', VIT_TINY, 7, ckpt_path=str(run / 'ckpt' / 'last.ckpt'))
    assert tr2.global_step == 7 and sorted(rec2.train) == [4, 5, 6]
    assert all(rec2.train[s] == rec.train[s] for s in rec2.train)
    a, b = ref.state_dict(), resumed.state_dict()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel()) < 1e-6


@needs_fmnist
@pytest.mark.slow
def test_multires_hierarchical_few_steps(tmp_path):
    _, tr, rec = _fit(tmp_path, SWIN, SWIN_TINY, 4, warmup_epochs=0.05, multires_sizes=[16, 32])
    assert tr.global_step == 4 and {s[-1] for s in rec.train.values()} == {16, 32}


@needs_fmnist
@pytest.mark.slow
def test_multires_ddp_same_schedule_on_both_ranks(tmp_path):
    """Lightning's DDP launcher, 2 CPU processes: both ranks train on the same sizes in the same order."""
    args = ['fit', '--config', str(ROOT / 'configs' / 'fmnist_vit_tiny_multires.yaml'),
            '--model.model_kwargs', json.dumps(VIT_TINY), '--data.img_size', '16', '--data.batch_size', '8',
            '--data.multires_range', '[12, 20]', '--data.multires_step', '4', '--data.train_subset', '128', '--data.val_subset', '16',
            '--data.test_subset', '16', '--trainer.max_steps', '4', '--trainer.max_epochs', '100',
            '--model.warmup_epochs', '0.25', '--trainer.enable_progress_bar', 'false',
            '--trainer.strategy', 'ddp', '--trainer.devices', '2', '--trainer.accelerator', 'cpu',
            '--test_after_fit', 'false',
            '--trainer.callbacks+=multires_helpers.WriteSizes', f'--trainer.callbacks.out_dir={tmp_path}']
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT / 'tests')])}
    res = subprocess.run([sys.executable, str(ROOT / 'train.py'), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    sizes = [json.loads((tmp_path / f'sizes_rank{r}.json').read_text()) for r in range(2)]
    assert len(sizes[0]) == 4 and len(set(sizes[0])) > 1 and sizes[0] == sizes[1]
