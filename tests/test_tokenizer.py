"""The converted GGUF carries Refact's real tokenizer, exactly."""

from __future__ import annotations

import gguf
import pytest

from refact_gguf.llama import Model
from refact_gguf.convert.synthetic import tokenizer_json
from refact_gguf.server.llama_api import extra_ids

from .conftest import VOCAB_GGUF


def _cases():
    inp = VOCAB_GGUF.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = VOCAB_GGUF.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    # The .inp file ends with the separator's newline; .out with a final newline.
    inp[-1] = inp[-1].removesuffix("\n__ggml_vocab_test__").removesuffix("\n")
    return list(zip(inp, ([int(t) for t in line.split()] for line in out)))


def test_there_are_47_cases(vocab_gguf):
    assert len(_cases()) == 47


def test_vocab_equals_llama_cpp_reference(vocab_gguf, converted_f32):
    ours, ref = gguf.GGUFReader(converted_f32.base).fields, gguf.GGUFReader(vocab_gguf).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        assert ours[key].contents() == ref[key].contents(), key


def test_llama_cpp_tokenizes_the_reference_strings(vocab_gguf, converted_f32):
    with Model(converted_f32.base, vocab_only=True) as m:
        for text, expected in _cases():
            assert m.tokenize(text) == expected, repr(text)


def test_fixture_tokenizer_json_matches_hf_tokenizers(vocab_gguf):
    """The tokenizer.json rebuilt for fixtures behaves like the real one in HF's own library."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_str(tokenizer_json())
    for text, expected in _cases():
        assert tok.encode(text, add_special_tokens=False).ids == expected, repr(text)


def test_special_text_is_not_parsed(converted_f32):
    with Model(converted_f32.base, vocab_only=True) as m:
        assert 3 not in m.tokenize("x = '<fim_suffix>'")
        assert m.tokenize("<fim_suffix>", special=True) == [3]


@pytest.mark.parametrize("line", ["    result", "x", " ", "\t# note", "1234", "'s"])
def test_a_fim_prompt_tokenizes_the_typed_line_as_the_whole_text_would(converted_f32, line):
    """build_prompt tokenizes only the prefix's last line again with the typed one (the rest is the
    same text every keystroke); the ids must be those of the prefix and line tokenized as one."""
    from refact_gguf.fim import build_prompt
    from refact_gguf.tokens import FIM_PREFIX_ID

    endings = ["def f(x):\n", "def f(x):\n\n", "    def g(self):  \n", "x = 1\n    ", "    return a + b",
               "\n", "a\n\t\t\n", "if x:\n\n        ", "y = 2\r\n", "s = 'it'"]
    with Model(converted_f32.base, vocab_only=True) as m:
        for ending in endings:
            p = build_prompt(m.tokenize, "import os\nimport sys\n\n" * 20 + ending, "\nreturn 0\n", budget=1000, line=line)
            assert p.tokens[p.tokens.index(FIM_PREFIX_ID) + 1 : -1] == m.tokenize(p.prefix), repr(ending)


def _tokenized(m: Model, monkeypatch) -> list[str]:
    """The texts `m` tokenizes from now on (those its token cache did not hold)."""
    texts: list[str] = []
    tokenize = m.tokenize
    monkeypatch.setattr(m, "tokenize", lambda text, *a, **kw: texts.append(text) or tokenize(text, *a, **kw))
    return texts


def test_a_teams_files_stay_in_the_token_cache(converted_f32, monkeypatch):
    """Eight people typing in whole files: each keystroke's prompt finds its file's texts (prefix,
    suffix, the cuts that fit them) tokenized already; only the typed line is new. A cache sized
    by a count of entries made these lookups miss (~40 ms of tokenizing a keystroke)."""
    from refact_gguf import tasks

    def source(i: int) -> str:  # ~25 KB of code per file, each file its own
        return "".join(f"def f{i}_{k}(x, y):\n    return x * {k} + y - {i}  # step {k}\n\n" for k in range(500))

    with Model(converted_f32.base, vocab_only=True) as m:
        misses = _tokenized(m, monkeypatch)
        files = [source(i) for i in range(8)]
        for typed in ("re", "ret", "retu"):
            misses.clear()
            for text in files:
                cut = len(text) // 3
                tasks.fim(m.tokenize_cached, 2048, text[:cut], text[cut:], max_tokens=16, line=typed, shortens=True)
            if typed != "re":
                assert len(misses) <= 2 * len(files), f"{len(misses)} texts tokenized again for {len(files)} keystrokes"


def test_one_persons_extra_chunks_stay_in_the_token_cache(converted_f32, monkeypatch):
    """llama.vim sends up to 16 chunks of other files (64 lines each) with every keystroke: with
    the file's own texts, more than a count-bounded cache held, so each keystroke tokenized them all
    again (~40 ms on two cores). Now only the typed line is new."""
    from refact_gguf import tasks

    chunks = ["".join(f"    value_{i}_{k} = compute({k}, {i})\n" for k in range(64)) for i in range(16)]
    text = "".join(f"def g{k}(a):\n    return a + {k}\n\n" for k in range(300))
    with Model(converted_f32.base, vocab_only=True) as m:
        misses = _tokenized(m, monkeypatch)
        for typed in ("re", "ret", "retu"):
            misses.clear()
            extra = extra_ids(m.tokenize_cached, chunks)  # as /infill does
            cut = len(text) // 2
            tasks.fim(m.tokenize_cached, 2048, text[:cut], text[cut:], max_tokens=16, line=typed, extra=extra)
        assert len(misses) <= 2, f"{len(misses)} texts tokenized again for one keystroke"


def test_the_token_cache_is_bounded_by_the_text_it_holds():
    from refact_gguf.llama import TokenCache

    cache = TokenCache(max_chars=400)
    for name in "ab":
        cache.put(name * 100, [ord(name)])
    assert cache.get("a" * 100) == [ord("a")]  # now the most recent
    cache.put("c" * 100, [3])
    cache.put("d" * 100, [4])  # 400 characters: all kept
    cache.put("e" * 50, [5])  # 450: the least recently used goes
    assert cache.get("b" * 100) is None
    assert [cache.get(n * k) for n, k in (("a", 100), ("c", 100), ("d", 100), ("e", 50))] == [[97], [3], [4], [5]]
    cache.put("f" * 101, [6])  # over a quarter of the bound: not kept, nothing pushed out
    assert cache.get("f" * 101) is None and cache.get("a" * 100) == [97]
