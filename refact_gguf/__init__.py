"""refact-gguf: run smallcloudai/Refact-1_6B-fim as GGUF quants, fully offline."""

__version__ = "0.1.0"
