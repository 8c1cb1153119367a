"""Calibration: the simulated cascade over recorded logits, its objectives, and the certified bounds."""

from .certification import *  # noqa: F403
from .certification import __all__ as _certification_all
from .simulation import *  # noqa: F403
from .simulation import __all__ as _simulation_all

__all__ = sorted(set(_simulation_all) | set(_certification_all))
