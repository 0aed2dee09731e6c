"""Rebuild Refact-1.6B's HF `tokenizer.json` from llama.cpp's vocab-only GGUF.

The package ships the result (gzip) so the offline synthetic model has the real tokenizer
without reading `../shared` at run time. Run once when the vocab changes:

    python scripts/make_vocab_asset.py ../shared/refact-vocab/ggml-vocab-refact.gguf
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from gguf import GGUFReader

CONTROL = 3  # llama.cpp token type of special tokens
OUT = Path(__file__).resolve().parent.parent / "refact_gguf" / "data" / "refact-tokenizer.json.gz"


def tokenizer_json(vocab_gguf: Path) -> dict:
    fields = GGUFReader(vocab_gguf).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    # llama.cpp pads the vocab to config.vocab_size with "[PADn]" user-defined tokens; the HF
    # tokenizer does not have them.
    real = [t for t in tokens if not t.startswith("[PAD")]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in range(len(real)) if types[i] == CONTROL
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(real)}, "merges": list(merges)},
    }


if __name__ == "__main__":
    data = json.dumps(tokenizer_json(Path(sys.argv[1])), ensure_ascii=False, separators=(",", ":"))
    OUT.write_bytes(gzip.compress(data.encode(), mtime=0))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
