"""Negotiator: a Django backend on which LLM agents negotiate, with live token streams."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("negotiator")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"
