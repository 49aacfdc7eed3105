"""A callback for the multi-resolution DDP test (imported by train.py's subprocesses from tests/)."""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class WriteSizes(Callback):
    """Writes the image size of every training batch of this rank to ``out_dir/sizes_rank{rank}.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.sizes = Path(out_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.sizes.append(int(batch[0].shape[-1]))

    def on_train_end(self, trainer, pl_module) -> None:
        (self.out_dir / f'sizes_rank{trainer.global_rank}.json').write_text(json.dumps(self.sizes))
