"""TensorBoard event files for a training run: loss, learning rates and epoch per optimizer step."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class TensorBoardLogger:
    """A trainer callback writing scalars to `log_dir`; warns once and stays silent without tensorboard."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed, so no event files are written: pip install tensorboard")
            return
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, event: str, trainer) -> None:
        if self._writer is None or event != "step":
            return
        info = trainer.info
        self._writer.add_scalar("loss", info.loss, info.step)
        self._writer.add_scalar("epoch", info.epoch, info.step)
        for group, lr in zip(("unet", "text_encoder"), trainer.scheduler.get_last_lr()):
            self._writer.add_scalar(f"lr/{group}", lr, info.step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
