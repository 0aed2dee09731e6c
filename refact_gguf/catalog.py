"""models.toml → frozen dataclasses: the only place quant facts live.

`python -m refact_gguf.catalog --readme` prints the README's quant table.
"""

from __future__ import annotations

import difflib
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from .errors import UnknownQuantError

__all__ = ["Catalog", "ModelInfo", "Quant", "UnknownQuantError", "load", "readme_table"]

GIB = 1024**3


# What a Refact model's hyperparameters can be. A checkpoint's config.json and a GGUF's metadata
# are both held to these: llama.cpp aborts (or divides by zero) on some values outside them, and a
# config with a trillion layers converted for ever.
HYPERPARAMETER_RANGES = {"n_layer": (1, 512), "n_ctx": (1, 1 << 20), "n_embd": (1, 1 << 16), "n_ff": (1, 1 << 18),
                         "n_head": (1, 1024), "n_head_kv": (1, 1024), "n_vocab": (1, 1 << 20)}


def ffn_width(n_embd: int) -> int:
    """Refact's SwiGLU width: 2/3 of 4·n_embd, rounded up to a multiple of 256 (5632 at 2048)."""
    hidden = int(2 * (4 * n_embd) / 3)
    return 256 * ((hidden + 255) // 256)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source_repo: str
    gguf_repo: str
    revision: str
    license: str
    file_pattern: str
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    n_vocab: int
    cpu_flash_attn: bool
    cpu_ubatch: int
    fim_context: int

    def attention(self, gpu: bool) -> tuple[bool | None, int]:
        """(flash attention: on, off or None for llama.cpp's choice; ubatch size) on a GPU or a CPU."""
        return (None, 512) if gpu else (self.cpu_flash_attn, self.cpu_ubatch)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def parameters(self) -> int:
        kv = self.n_head_kv * self.head_dim
        per_layer = (
            2 * self.n_embd * self.n_embd  # q, output
            + 2 * self.n_embd * kv  # k, v
            + 3 * self.n_embd * self.n_ff  # gate, up, down
            + 2 * self.n_embd  # ln_1, ln_2
        )
        return self.n_layer * per_layer + 2 * self.n_vocab * self.n_embd + self.n_embd


@dataclass(frozen=True)
class Quant:
    name: str
    ftype: int  # llama_ftype, as written to general.file_type
    size_gib: float
    kld: float
    imatrix: bool
    alias_of: str | None = None
    repair: bool = False  # `pull` centres the published file's residual writes (measured a gain: docs/quality.md)

    @property
    def size_bytes(self) -> int:
        return round(self.size_gib * GIB)

    def filename(self, model: ModelInfo) -> str:
        return model.file_pattern.format(name=self.name)

    def bpw(self, model: ModelInfo) -> float:
        return self.size_gib * GIB * 8 / model.parameters


@dataclass(frozen=True)
class Catalog:
    model: ModelInfo
    quants: tuple[Quant, ...]

    def names(self) -> list[str]:
        return [q.name for q in self.quants]

    def get(self, name: str) -> Quant:
        """Case-insensitive lookup; an unknown name lists the valid ones and the closest match."""
        by_upper = {q.name.upper(): q for q in self.quants}
        quant = by_upper.get(name.strip().upper())
        if quant is not None:
            return quant
        close = difflib.get_close_matches(name.upper(), list(by_upper), n=1, cutoff=0.5)
        hint = f"did you mean {by_upper[close[0]].name}?" if close else None
        raise UnknownQuantError(
            f"unknown quant {name!r}; valid: {', '.join(self.names())}", hint
        )

    def select(self, spec: str) -> list[Quant]:
        """`all` or a comma-separated list of names → quants in catalog order."""
        if spec.strip().lower() == "all":
            return list(self.quants)
        wanted = {self.get(part).name for part in spec.split(",") if part.strip()}
        return [q for q in self.quants if q.name in wanted]

    def quality_rank(self, quant: Quant) -> int:
        """1 = best (lowest KL divergence); aliases share their twin's rank."""
        distinct = sorted({q.kld for q in self.quants})
        return distinct.index(quant.kld) + 1


@cache
def load() -> Catalog:
    data = tomllib.loads(resources.files(__package__).joinpath("models.toml").read_text())
    return Catalog(
        model=ModelInfo(**data["model"]),
        quants=tuple(Quant(**q) for q in data["quant"]),
    )


def readme_table(catalog: Catalog | None = None) -> str:
    """The README's quant table, generated so it cannot drift from models.toml."""
    catalog = catalog or load()
    rows = [
        "| Name | Quant method | Size | Bits/weight | Quality rank (1 = best) | imatrix |",
        "|---|---|---|---|---|---|",
    ]
    for q in catalog.quants:
        rows.append(
            f"| {q.filename(catalog.model)} | {q.name} | {q.size_gib:.2f} GiB "
            f"| {q.bpw(catalog.model):.2f} | {catalog.quality_rank(q)} | {'yes' if q.imatrix else 'no'} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:] == ["--readme"]:
        print(readme_table())
    else:
        print("usage: python -m refact_gguf.catalog --readme", file=sys.stderr)
        sys.exit(2)
