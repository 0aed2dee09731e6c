"""Typed errors. Each carries a one-line message and, where there is one, the next step.

The CLI formats them once (`cli.main`); the library never prints.
"""

from __future__ import annotations


class RefactGGUFError(Exception):
    """Base class: a failure the user can act on."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class CheckpointError(RefactGGUFError):
    """The HF checkpoint directory is missing, malformed or not a Refact model."""


class TensorError(CheckpointError):
    """A tensor is unknown, missing, or its shape does not fit the config."""


class OutputError(RefactGGUFError):
    """The output cannot be written (permissions, disk full)."""


class QuantizeError(RefactGGUFError):
    """llama.cpp refused or failed a quantization."""


class ModelFileError(RefactGGUFError):
    """A GGUF file is missing, truncated, corrupt or not a Refact model."""


class UnknownQuantError(RefactGGUFError):
    """A quant name that is not in the catalog."""


class InputError(RefactGGUFError):
    """A request cannot be served as given: too long for the context, empty, malformed."""


class BusyError(RefactGGUFError):
    """Every slot is taken and the queue is full: try again shortly."""


class LlamaError(RefactGGUFError):
    """llama.cpp itself failed (a context it could not create, a decode it could not run)."""
