"""FIM prompt layout, truncation and stop rules: pure functions, no model."""

from __future__ import annotations

import pytest

from refact_gguf.errors import InputError
from refact_gguf.fim import Cuts, build_prompt
from refact_gguf import tasks
from refact_gguf.tasks import StopRules


def tok(text: str) -> list[int]:
    """One id per character, offset past the special ids."""
    return [100 + ord(c) for c in text]


def test_spm_layout_exact():
    p = build_prompt(tok, "ab", "cd", budget=100)
    assert p.tokens == [3, *tok("cd"), 1, *tok("ab"), 2]
    assert not p.truncated


def test_psm_layout_exact():
    p = build_prompt(tok, "ab", "cd", budget=100, order="psm")
    assert p.tokens == [1, *tok("ab"), 3, *tok("cd"), 2]


def test_unknown_order_is_a_clear_input_error():
    with pytest.raises(InputError, match="unknown FIM order 'xyz'"):
        build_prompt(tok, "a", "b", 10, order="xyz")


def test_truncation_keeps_text_nearest_the_cursor_on_line_boundaries():
    prefix = "".join(f"prefix line {i}\n" for i in range(100)) + "    cursor here"
    suffix = "".join(f"suffix line {i}\n" for i in range(100))
    p = build_prompt(tok, prefix, suffix, budget=400)
    assert p.prefix_truncated and p.suffix_truncated
    assert len(p.tokens) <= 400
    assert prefix.endswith(p.prefix) and p.prefix.startswith("prefix line ")  # whole lines, the tail
    assert suffix.startswith(p.suffix) and p.suffix.endswith("\n")  # whole lines, the head
    assert len(tok(p.suffix)) <= 0.25 * 397  # the documented split
    assert len(tok(p.prefix)) > len(tok(p.suffix))


def test_typing_on_a_new_line_keeps_a_truncated_layout():
    """In a file longer than the context, the first character typed on an empty line must not
    move the prefix cut: every token before the typed line stays valid in the KV cache."""
    prefix = "".join(f"prefix line {i}\n" for i in range(300))
    suffix = "".join(f"suffix line {i}\n" for i in range(300))
    prompts = [build_prompt(tok, prefix, suffix, budget=1000, line=typed).tokens for typed in ("", "x", "x = 1")]
    head = prompts[0][:-1]  # all but <fim_middle>
    assert len(prompts[0]) <= 1000 and all(p[: len(head)] == head for p in prompts[1:])


def test_a_long_prompt_carries_a_short_one_from_the_lines_around_the_cursor():
    prefix = "".join(f"prefix line {i}\n" for i in range(300))
    suffix = "".join(f"suffix line {i}\n" for i in range(300))
    task = tasks.fim(tok, 4096, prefix, suffix, line="    x", max_tokens=16, shortens=True)
    short = task.short(100)
    assert len(task.prompt) > 3000 and short.short_context and short.truncated and len(short.prompt) <= 100
    text = "".join(chr(t - 100) for t in short.prompt if t >= 100)
    assert text.startswith("suffix line 0\n") and text.endswith("prefix line 299\n    x")  # nearest the cursor
    assert not short.rules.multiline and "short context" in short.notes[0]
    # The next keystroke's short prompt of the same size only grows: its KV cache is the last one's.
    later = tasks.fim(tok, 4096, prefix, suffix, line="    xy", max_tokens=16, shortens=True).short(100).prompt
    assert later[: len(short.prompt) - 1] == short.prompt[:-1]
    assert tasks.fim(tok, 4096, "a", "b").short is None


def test_short_prefix_leaves_room_to_the_suffix():
    suffix = "".join(f"suffix line {i}\n" for i in range(100))
    p = build_prompt(tok, "x = ", suffix, budget=400)
    assert not p.prefix_truncated and p.suffix_truncated
    assert len(p.tokens) > 300  # the suffix used what the prefix did not


def test_overlong_cursor_line_is_cut_by_characters():
    p = build_prompt(tok, "y" * 1000, "", budget=53)
    assert p.prefix_truncated and len(p.tokens) <= 53 and p.prefix == "y" * len(p.prefix) and len(p.prefix) >= 25


def code_rules(prefix: str, suffix: str, **options) -> StopRules:
    return StopRules(code=True, prefix=prefix, suffix=suffix, **options)


def feed_all(rules: StopRules, text: str, step: int = 3) -> str:
    for i in range(0, len(text), step):
        if rules.feed(text[i : i + step]):
            break
    return rules.final()


def test_a_kept_cut_gives_the_prompt_a_fresh_cut_gives():
    """`Cuts` keeps a file's cut for its next keystrokes: the prompts are those cut afresh, whatever
    is typed (a line longer than the reserve moves the cut), in either order, with other files' ids."""
    prefix = "".join(f"prefix line {i}\n" for i in range(100)) + "    cursor "
    suffix = "".join(f"suffix line {i}\n" for i in range(100))
    cuts = Cuts()
    for budget in (100, 400, 10_000):
        for order in ("spm", "psm"):
            for line in ("", "r", "re", "return x", "y" * 90, "re"):
                for p, s in ((prefix, suffix), (prefix + "\n\n", ""), ("", suffix), ("x = 1", "\n")):
                    kept = build_prompt(tok, p, s, budget, order, line, extra=[7] * 50, cuts=cuts)
                    assert kept == build_prompt(tok, p, s, budget, order, line, extra=[7] * 50), (budget, order, line)


def test_a_files_next_keystroke_cuts_nothing_again():
    """The second keystroke in a file tokenizes only the typed line and the prefix's last line with it."""
    texts: list[str] = []

    def counted(text: str) -> list[int]:
        texts.append(text)
        return tok(text)

    prefix = "".join(f"prefix line {i}\n" for i in range(300)) + "    "
    suffix = "".join(f"suffix line {i}\n" for i in range(300))
    cuts = Cuts()
    build_prompt(counted, prefix, suffix, 1000, line="re", cuts=cuts)
    assert len(texts) > 4  # the first one fits the file: several candidate cuts
    texts.clear()
    p = build_prompt(counted, prefix, suffix, 1000, line="ret", cuts=cuts)
    assert texts == ["ret", "\n    ret"]
    assert p == build_prompt(tok, prefix, suffix, 1000, line="ret")


def test_cuts_are_bounded_by_the_text_they_hold():
    cuts = Cuts(max_chars=1000)
    files = [(c * 100, c * 100) for c in "abcde"]  # 200 characters of key each
    for p, s in files:
        cuts(tok, p, s, 50)
    cuts(tok, *files[0], 50)  # now the most recent
    cuts(tok, "f" * 100, "f" * 100, 50)  # 1,200 characters: the least recently used, "b", goes
    assert [cuts.get((p, s, 50)) is not None for p, s in files] == [True, False, True, True, True]


def test_single_line_stops_at_newline():
    r = code_rules("x = ", "", multiline=False)
    assert feed_all(r, "foo(1)\nbar()\n") == "foo(1)" and r.stopped == "newline"


def test_multiline_stops_at_blank_line():
    r = code_rules("def f():\n    ", "")
    assert feed_all(r, "a = 1\n    return a\n\n\ndef g():\n") == "a = 1\n    return a"
    assert r.stopped == "blank line"


def test_dedent_below_the_block_stops():
    r = code_rules("def f():\n    ", "")
    assert feed_all(r, "a = 1\n    b = 2\nprint(a)\n") == "a = 1\n    b = 2"
    assert r.stopped == "dedent"


def test_repeating_the_suffix_is_cut():
    r = code_rules("def f():\n    a = 1\n    ", "\n    return a\n")
    assert feed_all(r, "b = 2\n    return a\n") == "b = 2"
    assert r.stopped == "repeats suffix"


def test_suffix_repeat_on_the_cursor_line_gives_empty_completion():
    r = code_rules("def f():\n    ", "return a\n")
    assert feed_all(r, "return a\n") == ""


def test_empty_completion_is_valid():
    r = code_rules("x = 1\n", "")
    assert feed_all(r, "\n\n") == ""


def test_safe_text_never_shrinks():
    r = code_rules("def f():\n    ", "")
    seen = []
    for piece in ["a = 1", "\n    b", " = 2\n", "c = 3\n"]:
        r.feed(piece)
        seen.append(r.safe())
    final = r.final()
    assert all(final.startswith(s) for s in seen)
    assert seen[0] == "" and final == "a = 1\n    b = 2"


def test_unfinished_line_repeating_suffix_dropped_at_the_end():
    r = code_rules("    ", "\n    return a\n")
    r.feed("x = 1\n    return a")  # max_tokens hit mid-line
    assert r.final() == "x = 1"


def test_stop_strings_hold_back_what_a_stop_may_still_cut():
    r = StopRules(("STOP",))
    assert not r.feed("hello ST")
    assert r.safe() == "hello"  # "ST" (and the space before it, within the hold) could begin "STOP"
    assert r.feed("OP and more") and r.final() == "hello " and r.stopped == "stop string"


def test_chat_rules_strip_the_reply():
    r = StopRules(strip=True)
    r.feed("  Hi")
    r.feed(" there \n")
    assert r.final() == "Hi there"
