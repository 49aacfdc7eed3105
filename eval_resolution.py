"""Resolution-extrapolation evaluator: ``python eval_resolution.py --help`` (see :mod:`visionpe.eval.cli`).

No arguments: the model trained by ``python train.py`` on the Fashion-MNIST test set at 32..128 px.
"""
import sys

from visionpe.eval.cli import main

if __name__ == '__main__':
    sys.exit(main())
