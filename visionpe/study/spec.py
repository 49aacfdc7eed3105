"""A study: which encodings, trained with which recipes and seeds, evaluated at which sizes and knobs.

A study is one YAML file (``configs/study/*.yaml``) parsed by jsonargparse, the machinery of ``train.py``
(``--print_config`` shows every field with its default). It expands into :class:`Job` s, one per
(encoding, recipe, seed); each job trains one model and sweeps it, writing ``rows/<job>.jsonl``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..eval.data import parse_size

__all__ = ['Recipe', 'StudySpec', 'Job', 'parse_size', 'load_study', 'study_parser']

@dataclass
class Recipe:
    """A training recipe: a ``train.py`` config file plus extra command-line overrides.

    ``encodings``: the encodings trained with this recipe (default: all of the study's)."""
    name: str
    config: str
    args: list[str] = field(default_factory=list)
    encodings: list[str] | None = None


#: evaluator flags every job's sweep sets from the study's own fields (``eval_args`` may not repeat them)
STUDY_EVAL_FLAGS = frozenset({'--checkpoints', '--models', '--data', '--resolutions', '--train-res', '--output',
                              '--device', '--batch-size', '--per-image', '--no-progress', '--resume', '--max-images',
                              '--study', '--benchmark'})


@dataclass
class StudySpec:
    """One study. ``encodings``: names ``<pe>`` of ``model`` (``vit_{pe}_tiny``) or ``['all']`` (every
    encoding the model table has); ``sizes``: test sizes ``N`` or ``HxW``; ``knobs``: evaluator knob flags
    without dashes, each a list of values (``{'rope-scaling': ['none', 'ntk']}``); ``eval_images``: a fixed
    subset of the test set (``None``: all of it); ``epochs``: override the recipes' ``max_epochs``;
    ``train_args``: ``train.py`` arguments appended to every job's training command, after the recipe's own
    (e.g. ``[--trainer.max_steps, '4']`` for a smoke run); ``eval_args``: ``eval_resolution.py`` arguments
    appended to every job's sweep (e.g. ``[--keep-aspect]``, ``[--crop-ratio, '0.875']``), not those the
    study sets itself."""
    name: str
    recipes: list[Recipe]
    encodings: list[str] = field(default_factory=lambda: ['all'])
    model: str = 'vit_{pe}_tiny'
    data: str = 'fmnist'
    seeds: list[int] = field(default_factory=lambda: [0])
    sizes: list[str] = field(default_factory=lambda: ['32', '48', '64', '96', '128'])
    train_size: str = '32'
    knobs: dict[str, list[str]] = field(default_factory=dict)
    eval_images: int | None = None
    epochs: int | None = None
    train_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    output: str | None = None
    work_dir: str | None = None
    device: str = 'cpu'
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for s in (*self.sizes, self.train_size):
            parse_size(s)
        if not self.recipes:
            raise ValueError(f'study {self.name!r} has no recipes')
        names = [r.name for r in self.recipes]
        if len(set(names)) != len(names):
            raise ValueError(f'study {self.name!r}: recipe names must be unique, got {names}')
        if not self.seeds:
            raise ValueError(f'study {self.name!r} has no seeds')
        if '{pe}' not in self.model:
            raise ValueError(f"study {self.name!r}: model must contain '{{pe}}', got {self.model!r}")
        from ..eval.models import known_knobs
        flags = STUDY_EVAL_FLAGS | {k.option for k in known_knobs().values()}
        owned = sorted({a.split('=')[0] for a in self.eval_args} & flags)
        if owned:
            raise ValueError(f"study {self.name!r}: eval_args {owned} are set by the study itself (data, sizes, "
                             f"knobs, eval_images, device, eval_batch_size fields); use those fields instead")

    @property
    def out_dir(self) -> Path:
        return Path(self.output or Path('runs') / 'study' / self.name).resolve()

    @property
    def work_path(self) -> Path:
        """Where jobs train (checkpoints, logs): ``work_dir``, else ``runs/study/<name>`` when ``output`` is set
        (committed results hold rows and reports, never checkpoints), else ``<output>/runs``."""
        if self.work_dir:
            return Path(self.work_dir).resolve()
        return (Path('runs') / 'study' / self.name).resolve() if self.output else self.out_dir / 'runs'

    def all_encodings(self) -> list[str]:
        from ..models.vit import VIT_ENCODINGS
        return list(VIT_ENCODINGS)

    def resolve_encodings(self, names: list[str] | None) -> list[str]:
        names = list(self.encodings if names is None else names)
        if names == ['all']:
            return self.all_encodings()
        known = set(self.all_encodings())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f'study {self.name!r}: unknown encoding(s) {unknown}; known: {", ".join(sorted(known))}')
        return list(dict.fromkeys(names))

    def jobs(self) -> list['Job']:
        """Every (encoding, recipe, seed) of the study, in a stable order."""
        out = []
        for recipe in self.recipes:
            for pe in self.resolve_encodings(recipe.encodings):
                for seed in self.seeds:
                    out.append(Job(pe, recipe, int(seed), self.model.format(pe=pe)))
        return out

    def job(self, job_id: str) -> 'Job':
        for j in self.jobs():
            if j.id == job_id:
                return j
        raise KeyError(f'study {self.name!r} has no job {job_id!r}; `--list-jobs` lists them')


@dataclass(frozen=True)
class Job:
    """Train ``model`` with ``recipe`` and ``seed``, then sweep it."""
    encoding: str
    recipe: Recipe
    seed: int
    model: str

    @property
    def id(self) -> str:
        return f'{self.encoding}__{self.recipe.name}__s{self.seed}'


def study_parser():
    """The jsonargparse parser of a study file (``--study.*`` fields, ``--config``, ``--print_config``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser
    p = ArgumentParser(prog='visionpe.study', parser_mode='omegaconf', exit_on_error=False)
    p.add_argument('--config', action=ActionConfigFile, help='a study YAML file (configs/study/*.yaml)')
    p.add_class_arguments(StudySpec, nested_key=None, fail_untyped=True)
    return p


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudySpec:
    """Parse a study file (plus ``--field value`` overrides) into a :class:`StudySpec`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'study file {path} does not exist (see configs/study/)')
    p = study_parser()
    cfg = p.parse_args(['--config', str(path), *(overrides or [])])
    init = p.instantiate(cfg)
    fields = {k: v for k, v in vars(init).items() if k != 'config'}
    recipes = [r if isinstance(r, Recipe) else Recipe(**vars(r)) for r in fields.pop('recipes')]
    return StudySpec(recipes=recipes, **fields)
