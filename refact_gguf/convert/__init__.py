"""Faithful HF → GGUF conversion of Refact-1.6B, and every quant of the published table."""

from .pipeline import ConvertResult, convert

__all__ = ["ConvertResult", "convert"]
