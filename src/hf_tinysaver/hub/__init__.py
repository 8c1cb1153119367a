"""Publishing cascades: the push to the Hub and the generated model card."""

from .model_card import TinySaverModelCardData, generate_model_card
from .push import HubPushError, push_cascade, resolve_token

__all__ = ["HubPushError", "TinySaverModelCardData", "generate_model_card", "push_cascade", "resolve_token"]
