"""hf_tinysaver: TinySaver cascades (a tiny saver model answers the easy images) for Hugging Face classifiers."""

from .configuration_tinysaver import TINYSAVER_VERSION, TinySaverConfig

__version__ = TINYSAVER_VERSION

__all__ = ["TinySaverConfig", "__version__"]
