"""Resuming a run (``--ckpt_path``): the given model options must be the checkpoint's.

Lightning restores the weights, the optimizer and the scheduler from the checkpoint, but the module is built
from the options given now. A resumed run whose options differ from the saved ones would train something
other than what was asked (another model, or a schedule that silently keeps the old learning rate), so
:func:`check_resume_hparams` fails and lists the differing keys. Three kinds of options:

* free: they do not change what is trained (``compile``, ``grad_checkpointing``, ``ema_eval``): may differ;
* opt-in: they take effect when resuming (the loss, mixup/cutmix, the seed of the per-step RNG streams):
  may differ only when named in ``--allow_changed`` (``module.allow_changed``);
* fixed: everything else, i.e. the architecture and the data (rebuilt from the options: the weights would not
  fit) and the optimizer / schedule (restored from the checkpoint's state: a new value would not take
  effect). These cannot change on resume; start a new run from the weights instead.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ['check_resume_hparams', 'ResumeCheck']

log = logging.getLogger(__name__)


def _plain(v: Any) -> Any:
    """Values as a YAML round trip gives them (tuples as lists), for comparing given and saved options."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def check_resume_hparams(given: Mapping[str, Any], saved: Mapping[str, Any], *, free: Iterable[str] = (),
                         opt_in: Iterable[str] = (), allowed: Iterable[str] = (), path: str = 'the checkpoint') -> None:
    """Raise ``ValueError`` listing the options of ``given`` that differ from ``saved`` (keys in both), except
    those in ``free`` and those in both ``opt_in`` and ``allowed``; an ``allowed`` key outside ``opt_in`` is an
    error too. Keys missing on one side (an option added since the checkpoint was written) are not compared."""
    free, opt_in, allowed = set(free), set(opt_in), set(allowed)
    bad = sorted(allowed - opt_in - free)
    diff = {k: (saved[k], given[k]) for k in given if k in saved and _plain(given[k]) != _plain(saved[k])}
    if bad:
        raise ValueError(f'--allow_changed {bad}: these options cannot change on resume (the architecture and data '
                         f'are rebuilt from them, the optimizer and schedule are restored from the checkpoint, so a new '
                         f'value would not fit or not take effect); options that may change with --allow_changed: '
                         f'{sorted(opt_in)}')
    blocked = {k: v for k, v in diff.items() if k not in free and k not in allowed}
    if blocked:
        lines = '; '.join(f'{k}: checkpoint {a!r}, given {b!r}' for k, (a, b) in sorted(blocked.items()))
        fixed = sorted(k for k in blocked if k not in opt_in)
        hint = (f' {fixed} cannot change on resume: start a new run (without --ckpt_path) instead.' if fixed else '')
        raise ValueError(f'resuming from {path} with model options that differ from the checkpoint\'s: {lines}. Give '
                         f'the options of the original run (its config.yaml, e.g. --config <run>/csv/version_N/'
                         f'config.yaml).{hint} Options that take effect on resume may change when listed in '
                         f'--allow_changed (one of {sorted(opt_in)}).')
    for k, (a, b) in sorted(diff.items()):
        log.warning('resuming with %s=%r instead of the checkpoint\'s %r', k, b, a)


class ResumeCheck:
    """LightningModule mixin: when ``fit`` resumes from a checkpoint, :func:`check_resume_hparams` compares
    ``self.hparams`` with the checkpoint's (before any weight is loaded). Subclasses declare ``RESUME_FREE``
    and ``RESUME_OPT_IN``; ``allow_changed`` is set by ``--allow_changed`` (or by hand)."""

    RESUME_FREE: tuple[str, ...] = ()
    RESUME_OPT_IN: tuple[str, ...] = ()
    allow_changed: tuple[str, ...] = ()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer.state.fn == 'fit':
            check_resume_hparams(self.hparams, checkpoint.get('hyper_parameters') or {},  # type: ignore[attr-defined]
                                 free=self.RESUME_FREE, opt_in=self.RESUME_OPT_IN, allowed=self.allow_changed,
                                 path=str(trainer.ckpt_path))
