"""Training: few-step fits (ViT, hierarchical), exact resume (pre-emption signals and a crash),
the recipe parts, checkpoint loading for the evaluator, the CLI and its errors, DDP on 2 CPU processes."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import visionpe
from visionpe.data import FMNIST_MEAN
from visionpe.data.fashion_mnist import FMNIST_DIR
from visionpe.train import (ImageClassificationData, PreemptionCheckpoint, VisionClassifier,
                            load_model_from_checkpoint)
from visionpe.train.cli import DEFAULT_CONFIG, command_line_args, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / 'configs').glob('*.yaml'))
pytestmark = pytest.mark.skipif(not Path(FMNIST_DIR, 'train-images-idx3-ubyte.gz').is_file(),
                                reason='needs the Debian package dataset-fashion-mnist')

VIT = 'vit_rope2d_mixed_tiny'
VIT_TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, drop_path_rate=0.1)
SWIN_TINY = dict(patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
SWIN = 'swin_rope2d_tiny' if 'swin_rope2d_tiny' in visionpe.list_models() else 'swin_tiny_patch4_window7_224'


def tiny_data(**kw) -> ImageClassificationData:
    args = dict(dataset='fashion_mnist', img_size=16, batch_size=32, train_subset=256, val_subset=64,
                test_subset=64, seed=7)
    return ImageClassificationData(**{**args, **kw})


def tiny_module(dm: ImageClassificationData, name: str = VIT, kwargs=None, **kw) -> VisionClassifier:
    args = dict(model_name=name, model_kwargs=kwargs or VIT_TINY, num_classes=dm.num_classes, img_size=dm.img_size,
                mean=dm.mean, std=dm.std, dataset=dm.dataset, opt='adamw', lr=2e-3, weight_decay=0.05,
                warmup_epochs=0.25, warmup_lr=1e-5, min_lr=1e-4, mixup=0.8, cutmix=1.0, ema_decay=0.9, seed=3)
    return VisionClassifier(**{**args, **kw})


def trainer(tmp: Path, max_steps: int, callbacks=(), **kw) -> pl.Trainer:
    args = dict(accelerator='cpu', devices=1, max_steps=max_steps, default_root_dir=str(tmp), logger=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                gradient_clip_val=1.0, callbacks=list(callbacks))
    return pl.Trainer(**{**args, **kw})


def state(module: VisionClassifier):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def max_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


class RecordLR(Callback):
    def __init__(self):
        self.lr = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]['lr']


class Interrupt(Callback):
    """During optimizer step ``at`` (1-based): send a signal to this process, or crash (as a kill -9 would,
    the step never completes)."""

    def __init__(self, at: int, sig=None):
        self.at, self.sig = at, sig

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at - 1:
            if self.sig is None:
                raise RuntimeError('simulated kill -9')
            os.kill(os.getpid(), self.sig)


def fit(tmp: Path, max_steps: int = 12, extra=(), ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    dm = tiny_data()
    module = tiny_module(dm)
    rec = RecordLR()
    periodic = ModelCheckpoint(dirpath=str(tmp / 'ckpt'), filename='step{step:03d}', every_n_train_steps=4,
                               save_top_k=-1, save_last=True)
    tr = trainer(tmp, max_steps, [rec, PreemptionCheckpoint(), *extra, periodic])
    tr.fit(module, dm, ckpt_path=ckpt_path)
    return module, tr, rec


@pytest.mark.slow
def test_resume_is_exact_after_signals_and_a_crash(tmp_path):
    """12 uninterrupted steps == SIGUSR1 at step 6 + resume, crash at step 10 + resume from the periodic
    checkpoint of step 8 (an epoch end) == SIGTERM at step 3 + resume. Dropout/drop-path, mixup/cutmix,
    EMA, warmup + cosine and two epochs (8 batches each) are all in play."""
    ref, tr, rec = fit(tmp_path / 'ref')
    assert tr.global_step == 12 and tr.num_training_batches == 8  # two epochs, the second one partial
    ref_state = state(ref)
    # the schedule: linear warmup over 2 steps, then cosine to min_lr over the remaining 10
    lr, warm, mn = 2e-3, 2, 1e-4
    for step in (1, 2, 5, 9):
        want = 1e-5 + (lr - 1e-5) * step / warm if step < warm else \
            mn + 0.5 * (lr - mn) * (1 + math.cos(math.pi * (step - warm) / (12 - warm)))
        assert abs(rec.lr[step] - want) < 1e-9, (step, rec.lr[step], want)

    run = tmp_path / 'signals'
    last = run / 'ckpt' / 'last.ckpt'
    with pytest.raises(SystemExit) as e:
        fit(run, extra=[Interrupt(6, signal.SIGUSR1)])
    assert e.value.code == 128 + signal.SIGUSR1
    assert torch.load(last, weights_only=False)['global_step'] == 6
    with pytest.raises(RuntimeError, match='simulated'):
        fit(run, extra=[Interrupt(10)], ckpt_path=str(last))
    assert torch.load(last, weights_only=False)['global_step'] == 8  # the periodic checkpoint before the crash
    resumed, tr, rec2 = fit(run, ckpt_path='last')
    assert tr.global_step == 12
    assert max_diff(state(resumed), ref_state) < 1e-6
    assert all(abs(rec2.lr[s] - rec.lr[s]) < 1e-12 for s in rec2.lr)

    run = tmp_path / 'sigterm'
    with pytest.raises(SystemExit) as e:
        fit(run, extra=[Interrupt(3, signal.SIGTERM)])
    assert e.value.code == 128 + signal.SIGTERM
    resumed, _, _ = fit(run, ckpt_path=str(run / 'ckpt' / 'last.ckpt'))
    assert max_diff(state(resumed), ref_state) < 1e-6
    assert not getattr(signal.getsignal(signal.SIGUSR1), 'active', False)  # handler gone or inactive

    # the evaluator's loader rebuilds the model (EMA and raw weights) from the checkpoint
    x = torch.randn(4, 3, 16, 16)
    for use_ema, module in ((True, ref.model_ema.module), (False, ref.model)):
        model, info = load_model_from_checkpoint(tmp_path / 'ref' / 'ckpt' / 'last.ckpt', use_ema=use_ema)
        module.eval()
        with torch.no_grad():
            assert (model(x) - module(x)).abs().max().item() < 1e-6
        assert info['ema'] is use_ema
    assert info['model_name'] == VIT and info['model_kwargs'] == VIT_TINY and info['img_size'] == 16
    assert info['num_classes'] == 10 and info['dataset'] == 'fashion_mnist' and info['patch_size'] == (4, 4)
    assert info['mean'] == FMNIST_MEAN and info['global_step'] == 12
    # and at another resolution
    model, _ = load_model_from_checkpoint(tmp_path / 'ref' / 'ckpt' / 'last.ckpt', dynamic_img_size=True)
    assert model(torch.randn(2, 3, 24, 32)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize('name,kwargs', [(VIT, VIT_TINY), (SWIN, SWIN_TINY)], ids=['vit', 'hierarchical'])
def test_few_step_fit_validate_test(tmp_path, name, kwargs):
    pl.seed_everything(0, verbose=False)
    dm = tiny_data(img_size=32, train_subset=64, batch_size=16)
    module = tiny_module(dm, name, kwargs, mixup=0.0, cutmix=0.0, ema_decay=0.0, smoothing=0.1)
    before = state(module)
    tr = trainer(tmp_path, 3, precision='bf16-mixed', limit_val_batches=1)
    tr.fit(module, dm)
    after = state(module)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    params = [f'model.{n}' for n, p in module.model.named_parameters() if p.requires_grad]
    assert set(params) <= set(changed), set(params) - set(changed)  # every parameter was trained
    out = tr.test(module, dm, verbose=False)[0]
    assert 0 <= out['test/acc'] <= 1 and math.isfinite(out['test/loss'])


def test_no_weight_decay_groups():
    dm = tiny_data()
    module = tiny_module(dm, sched='none')
    opt = module.configure_optimizers()
    names = {id(p): n for n, p in module.model.named_parameters()}
    groups = {g['weight_decay']: {names[id(p)] for p in g['params']} for g in opt.param_groups}
    no_wd, wd = groups[0.0], groups[0.05]
    params = dict(module.model.named_parameters())
    listed = module.model.no_weight_decay()
    assert {'pe.freqs', 'cls_token'} <= listed <= no_wd | {'pos_embed', 'reg_token'}  # RoPE freqs, class token
    # timm's rule: the model's list plus every 1-D parameter (norms, biases, LayerScale) takes no decay
    assert no_wd == {n for n, p in params.items() if n in listed or p.ndim <= 1}
    assert wd == set(params) - no_wd and any('norm' in n for n in no_wd) and any(n.endswith('.bias') for n in no_wd)


def test_bad_model_config_errors():
    dm = tiny_data()
    with pytest.raises(ValueError, match=r'unknown model .*vit_rope2d_tinyy.*Did you mean'):
        tiny_module(dm, 'vit_rope2d_tinyy')
    with pytest.raises(TypeError, match='bad model_kwargs'):
        tiny_module(dm, kwargs={**VIT_TINY, 'no_such_option': 1})
    with pytest.raises(ValueError, match='num_classes'):
        tiny_module(dm, kwargs={**VIT_TINY, 'num_classes': 3})
    with pytest.raises(ValueError, match='data.dataset must be one of'):
        ImageClassificationData(dataset='cifar')
    with pytest.raises(ValueError, match='needs --data.root'):
        ImageClassificationData(dataset='imagefolder')
    with pytest.raises(ValueError, match='train_samples'):
        ImageClassificationData(dataset='webdataset', num_classes=10)


def _cli_args(tmp: Path, *extra: str):
    return ['fit', '--config', str(ROOT / 'configs' / 'fmnist_vit_tiny.yaml'),
            '--model.model_kwargs', json.dumps(VIT_TINY), '--data.img_size', '16', '--data.batch_size', '16',
            '--data.train_subset', '64', '--data.val_subset', '32', '--data.test_subset', '32',
            # max_steps ends the run, not the recipe's epoch count
            '--trainer.max_steps', '2', '--trainer.max_epochs', '100',
            '--model.warmup_epochs', '0.25', '--trainer.log_every_n_steps', '1',
            '--trainer.enable_progress_bar', 'false', *extra]


@pytest.mark.slow
def test_cli_default_config_runs_and_links(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config writes runs/... relative to the working directory
    # one override moves the whole run folder: loggers and checkpoints follow trainer.default_root_dir
    cli = main(_cli_args(tmp_path, '--model.model_name', 'vit_lookhere_tiny', '--trainer.default_root_dir', 'moved'))
    hp = cli.model.hparams
    assert hp.model_name == 'vit_lookhere_tiny' and hp.num_classes == 10 and hp.img_size == 16
    assert tuple(hp.mean) == FMNIST_MEAN and hp.dataset == 'fashion_mnist'
    assert cli.trainer.global_step == 2
    assert (tmp_path / 'moved' / 'checkpoints' / 'last.ckpt').is_file()
    metrics = cli.trainer.callback_metrics
    assert 'test/acc' in metrics  # test_after_fit ran
    csv = list((tmp_path / 'moved' / 'csv').glob('version_*/metrics.csv'))
    assert csv and 'lr-AdamW' in csv[0].read_text().splitlines()[0]
    assert list((tmp_path / 'moved' / 'tensorboard').glob('version_*/events.out.*'))
    assert not (tmp_path / 'runs').exists()


def test_command_line_without_subcommand_is_the_default_run():
    default = ['fit', '--config', str(DEFAULT_CONFIG)]
    assert command_line_args([]) == default
    assert command_line_args(['--trainer.max_epochs', '3']) == [*default, '--trainer.max_epochs', '3']
    assert command_line_args(['--config', 'x.yaml', '--seed_everything', '1']) == ['fit', '--config', 'x.yaml',
                                                                                     '--seed_everything', '1']
    assert command_line_args(['--config=x.yaml']) == ['fit', '--config=x.yaml']
    assert command_line_args(['--task', 'det', '--config', 'd.yaml']) == ['fit', '--task', 'det', '--config', 'd.yaml']
    for kept in (['test', '--config', 'x.yaml'], ['fit'], ['--help'], ['-h'], ['--task', 'det', 'fit'],
                 ['--task=det', 'validate', '--config', 'd.yaml']):
        assert command_line_args(kept) == kept


def test_cli_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match='unknown model'):
        main(_cli_args(tmp_path, '--model.model_name', 'vit_nonexistent_tiny'), run=False)
    with pytest.raises(ValueError, match="unknown model 'vit_rope2d_tiy'.*Did you mean.*vit_rope2d_tiny"):
        main(_cli_args(tmp_path, '--model.model_name', 'vit_rope2d_tiy'), run=False)  # near names suggested
    with pytest.raises(SystemExit):
        main(_cli_args(tmp_path, '--model.no_such_option', '1'), run=False)
    assert 'no_such_option' in capsys.readouterr().err
    cli = main(_cli_args(tmp_path, '--data.root', str(tmp_path / 'nowhere')), run=False)
    with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
        cli.trainer.fit(cli.model, cli.datamodule)


def test_print_config_and_every_config_parses(capsys, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(['fit', '--config', str(ROOT / 'configs' / 'fmnist_vit_tiny.yaml'), '--print_config'])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert 'model_name: vit_ape_tiny' in out and 'dataset: fashion_mnist' in out and 'max_epochs:' in out
    # one parser (building it is the slow part) checks every config and renders it as --print_config does
    monkeypatch.chdir(tmp_path)
    parser = main(_cli_args(tmp_path), run=False).parser
    assert {c.stem for c in CONFIGS} >= {'fmnist_vit_tiny', 'vit_small_in1k_deit3', 'vit_base_in1k_deit3',
                                         'swin_tiny_in1k', 'cswin_tiny_in1k'}
    for config in CONFIGS:
        cfg = parser.parse_args(['--config', str(config)])
        text = parser.dump(cfg, skip_none=False)
        assert f'model_name: {cfg.model.model_name}' in text and 'max_epochs:' in text, config
        assert '${' not in text and f'{cfg.trainer.default_root_dir}/checkpoints' in text, config  # resolved


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """Lightning's own DDP launcher, 2 CPU processes (gloo), a few steps, through train.py."""
    cmd = [sys.executable, str(ROOT / 'train.py'), *_cli_args(tmp_path, '--trainer.strategy', 'ddp',
                                                            '--trainer.devices', '2', '--trainer.accelerator', 'cpu',
                                                            '--trainer.max_steps', '3')]
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = torch.load(tmp_path / 'runs' / 'fmnist_vit_tiny' / 'checkpoints' / 'last.ckpt', weights_only=False)
    assert ckpt['global_step'] == 3
    loader_state = ckpt['loops']['fit_loop']['state_dict']['combined_loader'][0]
    # 64 samples over 2 ranks at batch 16: 2 batches per rank and epoch, so step 3 is epoch 1, batch 1
    assert loader_state['world_size'] == 2 and (loader_state['epoch'], loader_state['batches']) == (1, 1)
    assert 'test/acc' in res.stdout + res.stderr


@pytest.mark.parametrize('stop,every', [('max_steps', 4), ('max_steps', 5), ('max_epochs', 3), ('max_epochs', 4)],
                         ids=['steps-saved-at-end', 'steps-saved-before', 'epochs-saved-before', 'epochs-saved-at-end'])
def test_last_ckpt_holds_the_final_step(tmp_path, stop, every):
    """issue 17 defect 3: Lightning skips its end-of-fit ``last.ckpt`` once a periodic save wrote one, so a run
    of 10 steps with ``every_n_train_steps=4`` left ``last.ckpt`` at step 8. After ``fit``, ``last.ckpt`` must hold
    the final weights, whether the run ends on max_steps or max_epochs, with or without a save at the last step."""
    pl.seed_everything(0, verbose=False)
    dm = tiny_data(train_subset=128, batch_size=32)  # 4 batches per epoch
    module = tiny_module(dm, kwargs=dict(VIT_TINY, depth=1), mixup=0.0, cutmix=0.0, ema_decay=0.0, sched='none')
    periodic = ModelCheckpoint(dirpath=str(tmp_path / 'ckpt'), filename='step{step:03d}', every_n_train_steps=every,
                               save_top_k=1, save_last=True)
    limits = dict(max_steps=8 if every == 4 else 7) if stop == 'max_steps' else dict(max_steps=-1, max_epochs=2)
    tr = trainer(tmp_path, callbacks=[periodic], limit_val_batches=1, **limits)
    tr.fit(module, dm)
    final = tr.global_step
    assert final == (8 if every == 4 else 7 if stop == 'max_steps' else 8)
    ckpt = torch.load(tmp_path / 'ckpt' / 'last.ckpt', weights_only=True)
    assert ckpt['global_step'] == final
    assert max_diff({k[len('model.'):]: v for k, v in ckpt['state_dict'].items()},
                    {k: v for k, v in module.model.state_dict().items()}) == 0


@pytest.fixture(scope='module')
def cli_ckpt(tmp_path_factory):
    """A 2-step run of the default config (tiny data) through the public ``visionpe.train.fit``: its last.ckpt,
    for the resume tests."""
    tmp = tmp_path_factory.mktemp('cli_ckpt')
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        res = visionpe.train.fit(DEFAULT_CONFIG, model=dict(model_kwargs=VIT_TINY, warmup_epochs=0.25),
                                 data=dict(img_size=16, batch_size=16, train_subset=64, val_subset=32, test_subset=32),
                                 trainer=dict(max_steps=2, max_epochs=100, limit_val_batches=0, log_every_n_steps=1,
                                              enable_progress_bar=False, default_root_dir=str(tmp / 'run')),
                                 test_after_fit=False)
    finally:
        os.chdir(cwd)
    assert res.global_step == 2 and res.run_dir == tmp / 'run' and res.seconds > 0
    assert res.last_checkpoint == tmp / 'run' / 'checkpoints' / 'last.ckpt'
    assert res.best_checkpoint is None and 'train/loss_step' in res.metrics  # no validation ran: no best
    assert torch.load(res.last_checkpoint, weights_only=True)['global_step'] == 2
    return res.last_checkpoint


def _resume(tmp: Path, ckpt, *extra: str):
    return main(_cli_args(tmp, '--trainer.limit_val_batches', '0', '--trainer.max_steps', '3', '--test_after_fit',
                          'false', '--trainer.default_root_dir', str(tmp / 'resumed'), '--ckpt_path', str(ckpt), *extra))


@pytest.mark.parametrize('option,value,key', [('--model.lr', '0.1', 'lr'),
                                              ('--model.model_name', 'vit_rope2d_tiny', 'model_name')])
def test_resume_with_other_model_options_fails(cli_ckpt, tmp_path, monkeypatch, option, value, key):
    """issue 17 defect 5: resuming with --model.* values other than the checkpoint's trained the checkpoint's
    (Lightning's CLI replaced them silently); it must fail and name the differing keys."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf'differ.*\b{key}\b') as e:
        _resume(tmp_path, cli_ckpt, option, value)
    assert value in str(e.value) and '--allow_changed' in str(e.value)
    assert not (tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt').exists()


def test_resume_same_options_and_allowed_change(cli_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = _resume(tmp_path, cli_ckpt)  # the same options: resumes
    assert cli.trainer.global_step == 3
    # an option that takes effect on resume may change when named in --allow_changed; the run then uses it
    cli = _resume(tmp_path, cli_ckpt, '--model.smoothing', '0.2', '--allow_changed', '[smoothing]')
    assert cli.model.hparams.smoothing == 0.2 and cli.trainer.global_step == 3
    # one that the checkpoint's optimizer state overrides (the lr) cannot be opted in: it would not take effect
    with pytest.raises(ValueError, match=r"\['lr'\].*cannot change on resume"):
        _resume(tmp_path, cli_ckpt, '--model.lr', '0.1', '--allow_changed', '[lr]')


def test_resume_refuses_a_code_running_checkpoint(cli_ckpt, tmp_path, monkeypatch):
    """issue 17 defect 8: a checkpoint whose pickle would run code is refused by train.py without running it."""
    from test_ckpt_io import _RunsCode
    from visionpe.train.ckpt_io import UnsafeCheckpointError
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / 'ran'
    evil = tmp_path / 'evil.ckpt'
    ckpt = torch.load(cli_ckpt, weights_only=False)
    ckpt['payload'] = _RunsCode(marker)
    torch.save(ckpt, evil)
    with pytest.raises(UnsafeCheckpointError, match='trust-checkpoint'):
        _resume(tmp_path, evil)
    with pytest.raises(UnsafeCheckpointError, match='trust-checkpoint'):  # the test subcommand reads its hparams
        main(['test', '--config', str(DEFAULT_CONFIG), '--ckpt_path', str(evil)], run=True)
    assert not marker.exists(), 'the pickle ran code'
    cli = _resume(tmp_path, evil, '--trust-checkpoint')  # the explicit opt-in loads it (and runs it)
    assert cli.trainer.global_step == 3 and marker.exists()


def test_cli_rejects_abbreviated_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(_cli_args(tmp_path, '--trainer.max_epoch', '1'), run=False)
    assert 'max_epoch' in capsys.readouterr().err


def test_warmup_longer_than_a_short_run_is_clamped(tmp_path, caplog):
    """A smoke test (``--trainer.max_steps 20`` with the default recipe's 86 warm-up steps) was a ValueError; the
    warm-up is now clamped to half the run with a warning, and the schedule still warms up then decays."""
    pl.seed_everything(0, verbose=False)
    dm = tiny_data()  # 8 batches per epoch: warmup_epochs=2 is 16 steps
    module = tiny_module(dm, kwargs=dict(VIT_TINY, depth=1), mixup=0.0, cutmix=0.0, ema_decay=0.0, warmup_epochs=2.0)
    rec = RecordLR()
    caplog.set_level('WARNING')
    tr = trainer(tmp_path, 6, callbacks=[rec], limit_val_batches=0)
    tr.fit(module, dm)
    assert 'warm-up of 16 steps' in caplog.text and '3 steps' in caplog.text
    lr = [rec.lr[s] for s in range(1, 7)]
    assert lr[0] < lr[1] < lr[2] and lr[2] > lr[3] > lr[4] > lr[5], lr  # warm-up over 3 steps, then cosine
