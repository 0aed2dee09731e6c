#!/usr/bin/env python3
"""Convert a Refact HF checkpoint to GGUF, as llama.cpp's convert_hf_to_gguf.py does, but faithfully.

    python convert/convert_hf_to_gguf.py ./Refact-1_6B-fim -o out                    # f16
    python convert/convert_hf_to_gguf.py ./Refact-1_6B-fim -o out --quant Q4_K_M,Q8_0

Refact normalises with LayerNorm (no bias); llama.cpp's `refact` graph uses RMSNorm. This converter
centres every write into the residual stream, after which the two agree: the GGUF computes what
the checkpoint computes. It is refact-gguf's converter (`refact_gguf.convert`, also `refact-gguf
convert` and `python -m refact_gguf.convert`); this file only runs it from a checkout.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's package, installed or not

from refact_gguf.convert.__main__ import main  # noqa: E402

if __name__ == "__main__":
    main()
