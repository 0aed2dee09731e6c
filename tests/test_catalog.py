"""models.toml is the one source of truth; the README's table is generated from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from refact_gguf import catalog
from refact_gguf.errors import UnknownQuantError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_generated_from_models_toml():
    readme = README.read_text(encoding="utf-8")
    table = catalog.readme_table()
    assert table in readme, "README quant table drifted: paste `python -m refact_gguf.catalog --readme`"


def test_the_22_published_quants():
    cat = catalog.load()
    assert len(cat.quants) == 22
    assert cat.names()[0] == "Q2_K" and cat.names()[-1] == "Q8_0"
    assert cat.get("q4_k_m").filename(cat.model) == "Refact-1_6B-fim.Q4_K_M.gguf"
    assert {q.name: q.alias_of for q in cat.quants if q.alias_of} == {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
    # the published "0.9GB" of Q4_K_M is GiB: 968 MB on disk
    assert abs(cat.get("Q4_K_M").size_bytes / 1e6 - 968) < 10


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownQuantError, match="valid: Q2_K") as e:
        catalog.load().get("Q4_KM")
    assert e.value.hint == "did you mean Q4_K_M?"


def test_quality_rank_follows_kl():
    cat = catalog.load()
    assert cat.quality_rank(cat.get("Q8_0")) == 1
    assert cat.quality_rank(cat.get("Q4_K")) == cat.quality_rank(cat.get("Q4_K_M"))
    assert cat.quality_rank(cat.get("Q2_K")) == max(cat.quality_rank(q) for q in cat.quants)
