"""Data: Fashion-MNIST loading and conventions, batched augmentation geometry, resumable sampling,
corrupt images in image folders and webdataset shards."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from visionpe.data import (FMNIST_MEAN, FMNIST_STD, BadDataError, BadSampleMonitor, BatchScaleAugment,
                           ResumableBatchSampler, ResumableLoader, SafeImageFolder, ShardEvalStream, ShardStream,
                           check_image_folder, collate_skip_bad, eval_transform, fmnist_test_loader,
                           load_fashion_mnist, resize_batch)
from visionpe.data.fashion_mnist import FMNIST_DIR
from visionpe.data.imagefolder import Unreadable

HAVE_FMNIST = Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason='needs the Debian package dataset-fashion-mnist')


# ----------------------------------------------------------------------------- Fashion-MNIST
@needs_fmnist
def test_fmnist_loads_and_statistics_match_the_data():
    x, y = load_fashion_mnist('train')
    xt, yt = load_fashion_mnist('test')
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8 and y.shape == (60000,)
    assert xt.shape == (10000, 28, 28) and yt.shape == (10000,)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    hist = sum(torch.bincount(chunk.flatten().long(), minlength=256).double() for chunk in x.split(5000))
    v = torch.arange(256, dtype=torch.float64) / 255
    mean = (hist * v).sum() / hist.sum()
    std = ((hist * (v - mean) ** 2).sum() / hist.sum()).sqrt()
    assert abs(mean.item() - FMNIST_MEAN[0]) < 5e-4
    assert abs(std.item() - FMNIST_STD[0]) < 5e-4


def test_fmnist_missing_gives_install_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        load_fashion_mnist('train', root=str(tmp_path))
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_fashion_mnist('val')


@needs_fmnist
def test_fmnist_test_loader_any_size_and_subset():
    loader = fmnist_test_loader(48, batch_size=64, subset=100)
    batches = list(loader)
    assert len(batches) == len(loader) == 2
    x, y = batches[0]
    assert x.shape == (64, 3, 48, 48) and y.shape == (64,)
    assert sum(b[1].shape[0] for b in batches) == 100
    # the same fixed subset every time, and the same pixels as the eval transform
    again = next(iter(fmnist_test_loader(48, batch_size=64, subset=100)))
    assert torch.equal(again[1], y) and torch.equal(again[0], x)


def test_eval_transform_normalises_and_fills_the_frame():
    img = torch.zeros(1, 28, 28, dtype=torch.uint8)
    img[0, 7:21, 7:21] = 255  # a centred square of half the side
    for size in (32, 64, 128):
        x = eval_transform(size)(img)
        assert x.shape == (1, 3, size, size)
        raw = x[0, 0] * FMNIST_STD[0] + FMNIST_MEAN[0]
        # the item keeps its relative size: a quarter of the area is white at every size
        assert abs(raw.mean().item() - 0.25) < 0.02
        assert torch.allclose(x[0, 0], x[0, 2])


# ----------------------------------------------------------------------------- augmentation geometry
def _img(n=4, h=28, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, h, w, generator=g)


@pytest.mark.parametrize('size', [32, 48])
def test_identity_augment_equals_eval_view(size):
    """Training with canvas 1, scale 1, ratio 1, no flip presents exactly the evaluation view."""
    x = _img()
    aug = BatchScaleAugment(size, scale=(1, 1), ratio=(1, 1), canvas=(1, 1), hflip=0.0)
    out = aug(x, torch.Generator().manual_seed(0))
    ref = resize_batch(x, size)
    assert (out - ref).abs().max().item() < 1e-5
    flipped = BatchScaleAugment(size, scale=(1, 1), ratio=(1, 1), canvas=(1, 1), hflip=1.0)(
        x, torch.Generator().manual_seed(0))
    assert (flipped - ref.flip(-1)).abs().max().item() < 1e-5


def test_canvas_shrinks_item_and_crop_zooms_in():
    ones = torch.ones(64, 1, 28, 28)
    g = torch.Generator().manual_seed(0)
    # canvas of 2 item sides, whole canvas shown: the item covers 1/4 of the frame, placed anywhere
    out = BatchScaleAugment(32, scale=(1, 1), ratio=(1, 1), canvas=(2, 2), hflip=0)(ones, g)
    frac = out.mean(dim=(1, 2, 3))
    assert torch.allclose(frac, torch.full_like(frac, 0.25), atol=0.02)
    cols = torch.arange(32.0)
    cx = (out[:, 0].sum(1) * cols).sum(-1) / out[:, 0].sum((1, 2))  # horizontal centre of mass per sample
    assert cx.min() < 12 and cx.max() > 19  # placed anywhere on the canvas (range 8..23.5)
    # a crop inside the item (no canvas) only ever sees the item
    out = BatchScaleAugment(32, scale=(0.08, 1), canvas=(1, 1), hflip=0.5)(ones, g)
    assert torch.allclose(out, torch.ones_like(out), atol=1e-5)


def test_crop_scale_matches_requested_area():
    """A crop of area fraction s of a linear ramp spans sqrt(s) of its range (ratio 1)."""
    ramp = torch.linspace(0, 1, 28).view(1, 1, 1, 28).expand(16, 1, 28, 28).contiguous()
    for s in (0.25, 0.5):
        out = BatchScaleAugment(32, scale=(s, s), ratio=(1, 1), canvas=(1, 1), hflip=0)(
            ramp, torch.Generator().manual_seed(1))
        span = out[:, 0, 16, -1] - out[:, 0, 16, 0]
        # pixel centres of the 32-px output span (31/32) of the crop, the ramp spans 27/28 of the image
        expected = math.sqrt(s) * (31 / 32) * (28 / 27)
        assert torch.allclose(span, torch.full_like(span, expected), atol=0.02)


def test_augment_is_a_function_of_the_seed():
    x = _img(8)
    aug = BatchScaleAugment(32)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augment_rejects_bad_ranges():
    with pytest.raises(ValueError, match='scale'):
        BatchScaleAugment(32, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match='canvas'):
        BatchScaleAugment(32, canvas=(0.5, 1))


# ----------------------------------------------------------------------------- sampling
def test_sampler_partitions_ranks_and_resumes():
    n, b = 103, 8
    for drop_last in (True, False):
        per_rank = [list(ResumableBatchSampler(n, b, shuffle=True, drop_last=drop_last, seed=3, rank=r,
                                               world_size=2)) for r in range(2)]
        idx = [i for batches in per_rank for batch in batches for i, _ in batch]
        seeds = [s for batches in per_rank for batch in batches for _, s in batch]
        assert len(idx) == len(set(idx)) == len(set(seeds))
        if not drop_last:
            assert sorted(idx) == list(range(n))
        assert len(per_rank[0]) == len(ResumableBatchSampler(n, b, shuffle=True, drop_last=drop_last, rank=0,
                                                             world_size=2))
    s = ResumableBatchSampler(n, b, shuffle=True, drop_last=True, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    s.set_epoch(0)
    s.start_batch = 5
    assert list(s) == e0[5:]


def test_loader_state_resumes_mid_epoch_only_in_the_same_epoch():
    from torch.utils.data import DataLoader
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 50

        def __getitem__(self, item):
            return item[0]

    ds = Items()

    def make():
        bs = ResumableBatchSampler(50, 5, shuffle=True, drop_last=True, seed=1)
        return ResumableLoader(DataLoader(ds, batch_sampler=bs, collate_fn=list),
                               bs)

    full = make()
    full.sampler.set_epoch(2)
    batches = list(full)
    first = make()
    first.sampler.set_epoch(2)
    it = iter(first)
    got = [next(it) for _ in range(4)]
    state = first.state_dict()
    assert state['epoch'] == 2 and state['batches'] == 4
    resumed = make()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    assert got + list(resumed) == batches
    later = make()
    later.load_state_dict(state)
    later.sampler.set_epoch(3)  # the interrupted epoch was finished before: start the next one whole
    assert len(list(later)) == len(later)
    with pytest.raises(ValueError, match='data seed'):
        bad = make()
        bad.load_state_dict({**state, 'seed': 9})


# ----------------------------------------------------------------------------- image folders
def _png(color, size=(20, 24)) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, format='PNG')
    return buf.getvalue()


def make_image_folder(root: Path, per_class: int = 3, corrupt: int = 1) -> Path:
    for split in ('train', 'val'):
        for c, color in enumerate([(255, 0, 0), (0, 0, 255)]):
            d = root / split / f'class{c}'
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f'{i}.png').write_bytes(_png(color))
    for i in range(corrupt):
        (root / 'train' / 'class0' / f'corrupt{i}.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not an image' * 10)
    return root


def test_image_folder_skips_corrupt_and_counts(tmp_path, caplog):
    import torchvision.transforms as T
    root = make_image_folder(tmp_path)
    ds = SafeImageFolder(root / 'train', T.Compose([T.Resize((8, 8)), T.ToTensor()]))
    assert len(ds) == 7
    with caplog.at_level('WARNING'):
        items = [ds[(i, 1234)] for i in range(len(ds))]
    bad = [it for it in items if isinstance(it, Unreadable)]
    assert len(bad) == 1 and bad[0].path.endswith('corrupt0.png') and 'Error' in bad[0].reason
    assert 'corrupt0.png' in caplog.text
    batch = collate_skip_bad(items)
    assert batch['image'].shape == (6, 3, 8, 8) and int(batch['n_bad']) == 1 and int(batch['n']) == 7
    mon = BadSampleMonitor(max_fraction=0.2, check_after=1000)
    mon.update(1, 7)  # below check_after: no check yet
    mon.check(final=True)  # 1/7 = 14% <= 20%
    strict = BadSampleMonitor(max_fraction=0.1, check_after=5)
    with pytest.raises(BadDataError, match=r'1 of 7 images .* could not be read'):
        strict.update(1, 7)


def test_image_folder_missing_gives_layout_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'ROOT/train/<class>/<image>'):
        check_image_folder(tmp_path, 'train')


# ----------------------------------------------------------------------------- webdataset shards
def write_shards(root: Path, n_shards: int = 2, per_shard: int = 6, corrupt: bool = True) -> Path:
    import webdataset as wds
    root.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with wds.TarWriter(str(root / f'shard-{s:04d}.tar')) as sink:
            for i in range(per_shard):
                data = _png((10 * k % 255, 0, 0)) if not (corrupt and k == 3) else b'garbage'
                sink.write({'__key__': f'{k:06d}', 'png': data, 'cls': str(k % 2).encode()})
                k += 1
    return root


def test_shard_stream_is_deterministic_and_resumable(tmp_path, caplog):
    import torchvision.transforms as T
    root = write_shards(tmp_path / 'train')
    tf = T.Compose([T.RandomResizedCrop(8), T.ToTensor()])

    def stream(start=0, epoch=0):
        st = ShardStream(str(root), num_samples=12, batch_size=2, transform=tf, seed=0, shuffle_buffer=4)
        st.set_epoch(epoch)
        st.start_batch = start
        return list(st)

    with caplog.at_level('WARNING'):
        full = stream()
    assert len(full) == 6
    assert sum(int(b['n_bad']) for b in full) == 1 and '000003' in caplog.text
    again = stream()
    for a, b in zip(full, again):
        assert torch.equal(a['label'], b['label']) and torch.equal(a['image'], b['image'])
    resumed = stream(start=2)
    assert len(resumed) == 4
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a['image'], b['image'])
    assert not all(torch.equal(a['image'], b['image']) for a, b in zip(full, stream(epoch=1)))
    seen = [int(b['n']) for b in ShardEvalStream(str(root), batch_size=5, transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]))]
    assert sum(seen) == 12


def test_shard_stream_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no webdataset shards'):
        ShardStream(str(tmp_path), num_samples=10, batch_size=2)
    root = write_shards(tmp_path / 's', n_shards=1, corrupt=False)
    with pytest.raises(ValueError, match='streams'):
        ShardStream(str(root), num_samples=10, batch_size=2, world_size=2)


def test_bad_image_error_lists_the_first_paths():
    """issue 17: the error said 'the log lists their paths' while the README said training 'stops with the list';
    the error itself now names the first unreadable files."""
    from visionpe.data.imagefolder import Unreadable
    batch = collate_skip_bad([Unreadable('/data/a.jpg', 'UnidentifiedImageError'), None,
                              (torch.zeros(3, 2, 2), 0)])
    assert int(batch['n_bad']) == 2 and batch['bad_paths'] == ['/data/a.jpg']
    mon = BadSampleMonitor(max_fraction=0.1, check_after=1)
    with pytest.raises(BadDataError, match=r'2 of 3 images .*first: /data/a\.jpg'):
        mon.update(int(batch['n_bad']), int(batch['n']), batch['bad_paths'])


def test_bad_images_counted_without_the_sanity_check_and_logged(tmp_path):
    """The sanity-check validation batches are seen again by the real validation: they are not counted (the
    denominator was inflated by them); the skip count is logged as the metric data/skipped_images."""
    import lightning.pytorch as pl
    from visionpe.train import ImageClassificationData, VisionClassifier
    root = make_image_folder(tmp_path, per_class=3, corrupt=1)  # train: 7 images, 1 corrupt; val: 6
    dm = ImageClassificationData(dataset='imagefolder', root=str(root), img_size=16, batch_size=7, num_workers=0,
                                 auto_augment=None, re_prob=0.0, color_jitter=0.0, max_bad_fraction=0.5,
                                 pin_memory=False, persistent_workers=False)
    module = VisionClassifier('vit_ape_tiny', dict(patch_size=8, embed_dim=16, depth=1, num_heads=2),
                              num_classes=2, img_size=16, sched='none')
    tr = pl.Trainer(accelerator='cpu', max_epochs=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    tr.fit(module, dm)
    assert (dm.monitor.bad, dm.monitor.seen) == (1, 7 + 6)  # one training epoch and one validation, no sanity
    assert tr.callback_metrics['data/skipped_images'] == 1
