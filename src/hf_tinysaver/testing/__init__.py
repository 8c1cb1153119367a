"""Test helpers shipped with hf_tinysaver: a local server that speaks the Hugging Face Hub's HTTP API."""

from .hub_server import DEFAULT_TOKEN, DEFAULT_USER, FakeHub, HubClientEnvironment

__all__ = ["DEFAULT_TOKEN", "DEFAULT_USER", "FakeHub", "HubClientEnvironment"]
