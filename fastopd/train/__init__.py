"""Training: `OPDTrainer` and `OPDConfig`, the built-in addition task, atomic checkpoints, `fastopd distill`."""

from fastopd.train.config import ConfigError, OPDConfig
from fastopd.train.trainer import OPDTrainer, Terminated

__all__ = ["ConfigError", "OPDConfig", "OPDTrainer", "Terminated"]
