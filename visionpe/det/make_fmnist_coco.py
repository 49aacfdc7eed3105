"""``python -m visionpe.det.make_fmnist_coco ROOT``: write the Fashion-MNIST detection set in the COCO
2017 layout (see :func:`visionpe.det.data.make_fmnist_coco`)."""
from __future__ import annotations

import argparse
from typing import List, Optional

from .data import make_fmnist_coco


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], prog='python -m visionpe.det.make_fmnist_coco')
    p.add_argument('root', help='output folder (annotations/, train2017/, val2017/)')
    p.add_argument('--n-train', type=int, default=2000, help='training canvases')
    p.add_argument('--n-val', type=int, default=500, help='validation canvases')
    p.add_argument('--canvas', type=int, default=128, help='canvas side in pixels')
    p.add_argument('--items', type=int, nargs=2, default=(1, 4), metavar=('MIN', 'MAX'), help='items per canvas')
    p.add_argument('--item-size', type=int, nargs=2, default=(20, 56), metavar=('MIN', 'MAX'),
                   help='item side in pixels (Fashion-MNIST items are 28 px)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--fmnist-root', default=None, help='Fashion-MNIST IDX folder (default: the Debian package)')
    a = p.parse_args(argv)
    root = make_fmnist_coco(a.root, a.n_train, a.n_val, a.canvas, tuple(a.items), tuple(a.item_size), a.seed,
                            a.fmnist_root)
    print(f'wrote {a.n_train} train and {a.n_val} val canvases to {root}')


if __name__ == '__main__':
    main()
