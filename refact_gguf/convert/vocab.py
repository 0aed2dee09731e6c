"""HF `tokenizer.json` → llama.cpp's gpt2-BPE vocab metadata, the way llama.cpp's converter does it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType

from .. import tokens as special
from ..errors import CheckpointError


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]

    def id_of(self, token: str) -> int:
        try:
            return self.tokens.index(token)
        except ValueError:
            raise CheckpointError(
                f"tokenizer.json lacks the special token {token}", "is this Refact's own tokenizer?"
            ) from None

    @property
    def special_ids(self) -> dict[str, int]:
        """The ids llama.cpp needs for FIM and chat, looked up by text; they must be Refact's own,
        which the runtime builds prompts with."""
        for token, expected in special.IDS.items():
            if self.id_of(token) != expected:
                raise CheckpointError(f"tokenizer.json has {token} at id {self.id_of(token)}, Refact's is {expected}",
                                      "is this Refact's own tokenizer?")
        return {
            "eos": self.id_of(special.ENDOFTEXT),
            "fim_pre": self.id_of(special.FIM_PREFIX),
            "fim_suf": self.id_of(special.FIM_SUFFIX),
            "fim_mid": self.id_of(special.FIM_MIDDLE),
            "fim_pad": self.id_of(special.FIM_PAD),
            "empty_output": self.id_of(special.EMPTY_OUTPUT),
        }


def load_vocab(path: Path, n_vocab: int) -> Vocab:
    """Tokens padded to the config's vocab size with `[PADn]` user-defined tokens, as llama.cpp does."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
        raw_merges = model.get("merges", [])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"tokenizer.json is unreadable or not a HF tokenizer: {e}") from None
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer.json has a {model.get('type')} model; Refact's is BPE")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id, default=-1) >= n_vocab:
        raise CheckpointError(f"tokenizer.json has token id {max(by_id)}, but config.json vocab_size is {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.USER_DEFINED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    return Vocab(tokens, [int(t) for t in types], merges)
