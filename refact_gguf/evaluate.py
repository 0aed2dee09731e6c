"""Quantization quality on real code, against a reference GGUF (f32 or f16).

Per quant: mean KL divergence from the reference, top-1 agreement, Δ cross-entropy on the actual
next tokens, and FIM exact match on single-line infill tasks cut from the same code. Default
corpus: a fixed sample of the Python standard library (other files than the imatrix's), so the
numbers are reproducible anywhere.
"""

from __future__ import annotations

import sysconfig
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .llama import Context
from .errors import RefactGGUFError
from .progress import Progress
from .select import open_model

EVAL_SAMPLE = ("ast.py", "base64.py", "copy.py", "glob.py", "gzip.py", "inspect.py", "ipaddress.py", "operator.py",
               "pprint.py", "queue.py", "random.py", "shutil.py", "tempfile.py", "tokenize.py")


@dataclass(frozen=True)
class QualityResult:
    model: str
    mean_kl: float
    top1_agreement: float
    delta_ce: float  # cross-entropy (nats/token) minus the reference's
    fim_exact: float  # share of single-line infill tasks answered exactly
    n_tokens: int
    n_fim_tasks: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FimTask:
    prefix: str
    suffix: str
    expected: str


def corpus_texts(directory: Path | None = None) -> list[str]:
    if directory is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = [stdlib / n for n in EVAL_SAMPLE if (stdlib / n).is_file()]
    else:
        files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.suffix in {".py", ".js", ".ts", ".go", ".rs", ".c", ".java"})
    if not files:
        raise RefactGGUFError(f"no source files in {directory}")
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def fim_tasks(texts: list[str], n: int, context_chars: int = 1500) -> list[FimTask]:
    """Deterministic single-line tasks: hide one non-trivial line, keep its indentation as prefix."""
    tasks, rng = [], np.random.default_rng(0)
    for text in texts:
        lines = text.splitlines(keepends=True)
        candidates = [i for i, ln in enumerate(lines) if 12 <= len(ln.strip()) <= 60 and not ln.strip().startswith("#")]
        for i in rng.permutation(candidates)[:2] if candidates else []:
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            prefix = "".join(lines[:i])[-context_chars:] + indent
            suffix = "".join(lines[i + 1 :])[:context_chars // 3]
            tasks.append(FimTask(prefix, "\n" + suffix if lines[i].endswith("\n") else suffix, lines[i].strip()))
            if len(tasks) >= n:
                return tasks
    return tasks


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def evaluate(reference: Path, models: list[Path], corpus: Path | None = None, n_chunks: int = 4, chunk: int = 512,
             n_fim: int = 10, threads: int | None = None, progress: Progress | None = None) -> list[QualityResult]:
    """Compare each of `models` with `reference` on the same token chunks and FIM tasks."""
    progress = progress or Progress()
    texts = corpus_texts(corpus)
    with open_model(reference, 0) as ref_model:
        ids = [t for text in texts for t in ref_model.tokenize(text)]
        n = min(n_chunks, len(ids) // chunk)
        if n == 0:
            raise RefactGGUFError(f"the corpus has {len(ids)} tokens, fewer than one chunk of {chunk}")
        chunks = np.array(ids[: n * chunk]).reshape(n, chunk)
        n_vocab = ref_model.n_vocab
        with tempfile.TemporaryDirectory() as tmp:
            # Reference log-probs live on disk as float16: n × chunk × vocab is 400 MB at 8 chunks.
            ref_lp = np.lib.format.open_memmap(Path(tmp) / "ref.npy", mode="w+", dtype=np.float16, shape=(n, chunk, n_vocab))
            progress.start(f"reference {Path(reference).name}", n)
            # The same context and batch shape as the scored models' (`_score`): with another KV size, llama.cpp's
            # attention rounds differently, and that noise would be counted as quantization error.
            with Context(ref_model, n_ctx=_score_ctx(chunk), threads=threads) as ctx:
                for i, row in enumerate(chunks):
                    ctx.reset()
                    ref_lp[i] = _log_softmax(ctx.eval(row.tolist(), all_logits=True))
                    progress.advance()
            progress.finish()
            return [_score(path, ref_lp, chunks, fim_tasks(texts, n_fim), threads, progress) for path in models]


def _score_ctx(chunk: int) -> int:
    return max(chunk, 1024)  # the FIM tasks need room beyond a chunk


def _score(path: Path, ref_lp: np.ndarray, chunks: np.ndarray, tasks: list[FimTask], threads, progress: Progress) -> QualityResult:
    from .runtime import Runtime

    n, chunk = chunks.shape
    pos = np.arange(chunk - 1)
    ref_ce = -np.mean([ref_lp[i, pos, chunks[i, 1:]].astype(np.float64).mean() for i in range(n)])
    progress.start(f"eval {Path(path).name}", n + len(tasks))
    kls, agree, ces, exact = [], [], [], 0
    with open_model(Path(path), 0) as model, Runtime(model, n_ctx=_score_ctx(chunk), threads=threads) as rt:
        for i, row in enumerate(chunks):
            lp = _log_softmax(rt.logits_of(row.tolist()))
            p_ref = ref_lp[i].astype(np.float64)
            kls.append((np.exp(p_ref) * (p_ref - lp)).sum(-1).mean())
            # Agreement: the model's top token is a top token of the reference. The reference is kept
            # as float16, whose rounding ties near-equal log-probs; a tie is not a disagreement.
            picked = np.take_along_axis(p_ref, lp.argmax(-1)[:, None], -1)[:, 0]
            agree.append((picked >= p_ref.max(-1)).mean())
            ces.append(-lp[pos, row[1:]].mean())
            progress.advance()
        for task in tasks:
            exact += rt.fim(task.prefix, task.suffix, max_tokens=48, multiline=False).text.strip() == task.expected
            progress.advance()
    progress.finish(f"{Path(path).name}: mean KL {np.mean(kls):.4f}")
    return QualityResult(Path(path).name, float(np.mean(kls)), float(np.mean(agree)), float(np.mean(ces) - ref_ce),
                         exact / len(tasks) if tasks else 0.0, int(n * chunk), len(tasks))
