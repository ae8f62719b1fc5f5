"""Backends a program runs on: the embedded engine (``Runtime``) and an OpenAI-compatible server (``OpenAI``)."""

from .base import Backend, GenResult
from .openai import OpenAI
from .runtime import Runtime

__all__ = ["Backend", "GenResult", "OpenAI", "Runtime"]
