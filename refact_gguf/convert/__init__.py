"""Faithful HF → GGUF conversion of Refact-1.6B, and every quant of the published table."""

__all__ = ["ConvertResult", "convert"]


def __getattr__(name: str):
    # Loaded on first use: the checkpoint reader, the synthetic writer and the reference forward
    # need no llama.cpp, and a machine still building it (the stand-in's trainer) can use them.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
