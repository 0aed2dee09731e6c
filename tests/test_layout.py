"""The rows of one engine step (refact_gguf.layout), without llama.cpp: the rules that keep a
batch of many people one pass over the weights, and background work from starving or crowding."""

from __future__ import annotations

import numpy as np

from refact_gguf.layout import DRIBBLE, LONE_DRIBBLE, REUSE_CHUNK, Room, Sequence, draft, plan, same_file

CPU = Room(capacity=512, n_ubatch=128, every_row=False, background=32)
GPU = Room(capacity=512, n_ubatch=512, every_row=True, background=128)


def idle(n: int) -> list[Sequence]:
    return [Sequence(i) for i in range(n)]


def with_(seqs: list[Sequence], **changed: Sequence) -> list[Sequence]:
    out = list(seqs)
    for s in changed.values():
        out[s.seq] = s
    return out


def test_nothing_busy_is_no_step():
    assert plan(idle(4), CPU) == []


def test_gaps_between_busy_sequences_get_fillers_so_ids_stay_consecutive():
    seqs = with_(idle(32), a=Sequence(3, generating=True), b=Sequence(9, generating=True), c=Sequence(20, generating=True))
    rows = plan(seqs, CPU)
    assert [r.seq for r in rows] == list(range(3, 21))  # one run of ids, 3 to 20
    assert {r.seq for r in rows if r.kind == "token"} == {3, 9, 20}
    assert all(r.kind == "filler" and not r.output for r in rows if r.seq not in (3, 9, 20))


def test_on_a_gpu_every_sequence_has_a_row_and_every_row_an_output_while_several_are_busy():
    """One graph step after step: the same rows and outputs whoever is busy."""
    for busy in ({0, 5, 7}, {2, 3}, set(range(8))):
        seqs = [Sequence(i, generating=i in busy) for i in range(8)]
        rows = plan(seqs, GPU)
        assert [r.seq for r in rows] == list(range(8)) and all(r.output for r in rows)
        assert [r.seq for r in rows if r.answer] == sorted(busy)


def test_on_a_gpu_a_lone_busy_sequence_decodes_alone():
    seqs = [Sequence(i, generating=i == 5) for i in range(8)]
    assert [(r.seq, r.kind) for r in plan(seqs, GPU)] == [(5, "token")]


def test_on_a_gpu_idle_scratch_sequences_after_the_people_get_no_row():
    seqs = [Sequence(i, generating=i in (1, 2)) for i in range(12)]  # 8 people's slots, 4 scratch sequences
    room = Room(512, 512, True, 128, people=8)
    assert [r.seq for r in plan(seqs, room)] == list(range(8))
    seqs[9] = Sequence(9, generating=True)  # a short answer on the second scratch sequence
    assert [r.seq for r in plan(seqs, room)] == list(range(10))


def test_a_full_cache_gets_no_filler():
    seqs = with_(idle(3), a=Sequence(0, generating=True), b=Sequence(1, full=True), c=Sequence(2, generating=True))
    assert [r.seq for r in plan(seqs, CPU)] == [0, 2]


def test_a_keystrokes_few_tokens_go_one_a_step_beside_others_and_all_at_once_alone():
    typing = Sequence(1, todo=3)
    beside = plan(with_(idle(2), a=Sequence(0, generating=True), b=typing), CPU)
    assert [(r.kind, r.n, r.answer) for r in beside] == [("token", 1, True), ("prompt", 1, False)]
    alone = plan(with_(idle(2), b=typing), CPU)
    assert [(r.kind, r.n, r.answer) for r in alone] == [("prompt", 3, True)]


def test_on_a_gpu_a_lone_keystrokes_few_tokens_go_one_a_step_each_an_output():
    """Every step one token, one output: the shape CUDA replays its graph for."""
    for todo, rows in ((1, [("prompt", 1, True, True)]), (LONE_DRIBBLE, [("prompt", 1, True, False)]),
                       (LONE_DRIBBLE + 1, [("prompt", LONE_DRIBBLE + 1, True, True)])):
        got = plan(with_(idle(3), b=Sequence(1, todo=todo)), GPU)
        assert [(r.kind, r.n, r.output, r.answer) for r in got] == rows


def test_a_long_prompt_and_a_short_answer_go_in_whole_beside_others():
    for s in (Sequence(1, todo=DRIBBLE + 1), Sequence(1, todo=20, short=True)):
        rows = plan(with_(idle(2), a=Sequence(0, generating=True), b=s), CPU)
        assert rows[1].n == s.todo and rows[1].answer and rows[1].output


def test_prompt_room_goes_first_come_first_served_within_the_batch():
    seqs = with_(idle(3), a=Sequence(0, todo=400, rank=1), b=Sequence(1, todo=400, rank=0), c=Sequence(2, generating=True))
    rows = {r.seq: r for r in plan(seqs, Room(512, 512, False, 512))}
    assert rows[1].n == 400 and rows[0].n == 512 - 400 - 1  # the earlier one whole, the later one what is left
    assert sum(r.n for r in rows.values()) <= 512


def test_a_short_answers_prompt_goes_in_whole_before_an_earlier_files_prompt():
    """Sized to fit its budget, a short prompt must not go in a token a step behind a whole file's
    chunk (eight typists, two CPU cores: it missed t_max_prompt_ms and the answer came back empty)."""
    seqs = with_(idle(3), a=Sequence(0, todo=2000, rank=0), b=Sequence(1, todo=20, rank=1, short=True),
                 c=Sequence(2, generating=True))
    rows = {r.seq: r for r in plan(seqs, Room(512, 512, False, 512))}
    assert rows[1].n == 20 and rows[1].answer and rows[0].n == 512 - 20 - 1  # the rest of the batch


def test_background_takes_a_bounded_share_while_people_wait_and_a_ubatch_when_they_do_not():
    job = Sequence(1, todo=3000, background=True)
    beside = plan(with_(idle(2), a=Sequence(0, generating=True), b=job), CPU)
    assert beside[1].n == CPU.background  # a share: it converges under steady typing, and costs a bounded step
    alone = plan(with_(idle(2), b=job), Room(512, 128, False, 1000))
    assert alone[0].n == 128  # one ubatch at most: a step given up loses no finished ubatch


def test_background_jobs_share_one_budget_oldest_first_and_the_rest_wait_idle():
    seqs = with_(idle(4), a=Sequence(0, generating=True), b=Sequence(1, todo=3000, background=True, rank=2),
                 c=Sequence(2, todo=3000, background=True, rank=1), d=Sequence(3, todo=3000, background=True, rank=3))
    rows = {r.seq: r for r in plan(seqs, CPU)}
    assert rows[2].kind == "prompt" and rows[2].n == CPU.background  # the oldest job takes the share
    assert rows[1].kind == "filler"  # the others wait; the ids stay consecutive
    assert 3 not in rows  # at the end of the run a waiting job costs no row
    assert sum(r.n for r in rows.values() if r.kind == "prompt") == CPU.background


def test_a_prompt_row_is_an_answer_only_on_its_last_chunk():
    rows = plan(with_(idle(1), a=Sequence(0, todo=1000)), Room(512, 512, False, 512))
    assert rows[0].n == 512 and not rows[0].answer and not rows[0].output
    rows = plan(with_(idle(1), a=Sequence(0, todo=300)), Room(512, 512, False, 512))
    assert rows[0].n == 300 and rows[0].answer and rows[0].output


def ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int32)


def test_a_draft_is_what_followed_the_latest_earlier_run_of_the_last_ids():
    history = ids(1, 2, 3, 4, 50, 51, 9, 2, 3, 4, 60, 61, 62, 7, 2, 3, 4)
    assert draft(history, 2).tolist() == [60, 61]  # the latest of two earlier runs of 2 3 4
    assert draft(history, 9).tolist() == [60, 61, 62, 7, 2, 3, 4]  # up to the end, not past it


def test_a_longer_match_wins_over_a_later_shorter_one():
    history = ids(8, 3, 4, 70, 5, 3, 4, 80, 8, 3, 4)
    assert draft(history, 1).tolist() == [70]  # 8 3 4 occurs once, earlier than the later 3 4


def test_no_run_of_the_shortest_length_is_no_draft_and_the_tail_is_not_its_own_match():
    assert draft(ids(1, 2, 3, 4, 5), 4).tolist() == []
    assert draft(ids(7, 7), 4).tolist() == []  # a run of 2 needs an earlier copy of 7 7
    assert draft(ids(7, 7, 7), 4).tolist() == [7]


def test_two_prompts_are_one_file_when_they_share_their_head_or_a_run_from_the_middle():
    rng = np.random.default_rng(0)
    text = rng.integers(100, 49000, 600).tolist()
    assert same_file(text[:300], text[:300] + [1, 2, 3])  # one keystroke on
    assert same_file(text[:400], text[37:400])  # the head cut as the line grew: a run from the middle is found
    other = rng.integers(100, 49000, 400).tolist()
    assert not same_file(text[:400], other)
    assert not same_file(text[:REUSE_CHUNK], text[5 : REUSE_CHUNK + 5])  # too short to search: only the head counts


def test_a_lone_answer_beside_a_job_past_its_share_decodes_alone_on_a_cpu():
    # a cold file's job in the person's slot (0), its short answer on a scratch sequence (1)
    seqs = [Sequence(0, todo=2000, background=True), Sequence(1, generating=True)]
    rows = plan(seqs, Room(512, 512, False, 0))
    assert [(r.seq, r.kind) for r in rows] == [(1, "token")]
    assert [(r.seq, r.kind) for r in plan(seqs, Room(512, 512, False, 1))] == [(0, "prompt"), (1, "token")]
