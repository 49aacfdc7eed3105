"""Resolution-extrapolation evaluation: train at one resolution, measure at many.

``python eval_resolution.py`` (:func:`visionpe.eval.cli.main`) sweeps models x test-time knobs x
resolutions with one engine (:mod:`.engine`) and a task (:mod:`.runner`: classification on an image
folder or Fashion-MNIST, :mod:`.data`; COCO detection through ``visionpe.det.evaluate``, ``--task coco``),
and writes CSV / JSON / Markdown / PNG (:mod:`.report`). The knobs are declared by the encodings and
models (:class:`visionpe.pos.base.Knob`, docs/knobs.md).
``--study FILE`` / ``--benchmark fmnist`` hand over to the study runner (:mod:`visionpe.study`).
"""
from .engine import Case, Plan, Task, sweep
from .models import Knobs, KnobSpace, ModelSource, apply_knobs, knob_support, known_knobs
from .runner import EvalConfig, EvalResult, evaluate_classifier, run_eval

__all__ = ['Case', 'EvalConfig', 'EvalResult', 'Knobs', 'KnobSpace', 'ModelSource', 'Plan', 'Task', 'apply_knobs',
           'evaluate_classifier', 'knob_support', 'known_knobs', 'main', 'run_eval', 'sweep', 'write_reports']


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)


def write_reports(*args, **kwargs):
    from .report import write_reports as _write
    return _write(*args, **kwargs)
