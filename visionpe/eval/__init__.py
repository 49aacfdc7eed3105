"""Resolution-extrapolation evaluation: train at one resolution, measure at many.

``python eval_resolution.py`` (:func:`visionpe.eval.cli.main`) sweeps models x test-time knobs x
resolutions (:mod:`.runner`) on an image folder or Fashion-MNIST (:mod:`.data`), or COCO through
``visionpe.det.evaluate`` (``--task coco``), and writes CSV / JSON / Markdown / PNG (:mod:`.report`).
``--benchmark fmnist`` trains every ``vit_<pe>_tiny`` first (:mod:`.fmnist_bench`).
"""
from .models import Knobs, KnobSpace, ModelSource, apply_knobs, knob_support
from .runner import EvalConfig, EvalResult, evaluate_classifier, run_eval

__all__ = ['EvalConfig', 'EvalResult', 'Knobs', 'KnobSpace', 'ModelSource', 'apply_knobs', 'evaluate_classifier',
           'knob_support', 'main', 'run_eval', 'write_reports']


def main(argv=None) -> int:
    from .cli import main as _main
    return _main(argv)


def write_reports(*args, **kwargs):
    from .report import write_reports as _write
    return _write(*args, **kwargs)
