"""Calibration: the simulated cascade (and chain of savers) over recorded logits, its objectives, the binomial bounds
and the certificates built on them, the per-exit thresholds of multi-exit cascades, and the calibration record both kinds store."""

from .bounds import *  # noqa: F403
from .bounds import __all__ as _bounds_all
from .certification import *  # noqa: F403
from .certification import __all__ as _certification_all
from .chain import *  # noqa: F403
from .chain import __all__ as _chain_all
from .chain_search import *  # noqa: F403
from .chain_search import __all__ as _chain_search_all
from .checks import *  # noqa: F403
from .checks import __all__ as _checks_all
from .multi_exit import *  # noqa: F403
from .multi_exit import __all__ as _multi_exit_all
from .record import *  # noqa: F403
from .record import __all__ as _record_all
from .simulation import *  # noqa: F403
from .simulation import __all__ as _simulation_all

__all__ = sorted(
    set(_bounds_all)
    | set(_chain_all)
    | set(_chain_search_all)
    | set(_certification_all)
    | set(_checks_all)
    | set(_multi_exit_all)
    | set(_record_all)
    | set(_simulation_all)
)
