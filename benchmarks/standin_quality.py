"""Issue #14's measurements on a trained stand-in (scripts/train_standin.py), end to end:

1. train it (or take --checkpoint), convert to F32 and F16 and every quant of the table;
2. conversion fidelity on trained weights: F32 and F16 GGUFs against the checkpoint's PyTorch forward;
3. per quant: KL and top-1 against F16 (`eval`), HumanEval pass@1 / exact match for complete,
   single-line and multi-line infill (`eval --humaneval`), size, tokens/s (`bench`);
4. the stop rules on the canonical answers (`humaneval.stop_rule_fit`) and, from the F16 model's
   answers, examples of where they cut.

    python benchmarks/standin_quality.py --work /tmp/standin --out results/            # GPU: train + all
    python benchmarks/standin_quality.py --work /tmp/standin --checkpoint /tmp/ckpt \\
        --quants Q4_K_M,Q8_0 --problems 20 --threads 2                                # CPU, a subset

Writes --out/quality.json (everything) and --out/quality.md (the tables of docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refact_gguf import catalog, humaneval  # noqa: E402
from refact_gguf.bench import bench  # noqa: E402
from refact_gguf.convert import convert  # noqa: E402
from refact_gguf.evaluate import evaluate  # noqa: E402
from scripts.train_standin import Settings, default_sources, fidelity, train  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


RULES = ("dedent", "blank line", "repeats suffix")


def examples(records: list[dict], n: int = 6) -> list[dict]:
    """F16's infill answers where a stop rule ended a right start at a line break the hidden text
    goes on past, and where a right answer ran on past the hidden text."""
    cut, ran_on = [], []
    for r in records:
        if r["kind"] == "complete" or r["exact"]:
            continue
        answer, expected = r["answer"].rstrip(), r["expected"].rstrip()
        if answer.strip() and expected.startswith(answer + "\n") and r["stop_reason"] in RULES:
            cut.append({**r, "why": f"stopped by '{r['stop_reason']}' where the hidden text goes on"})
        elif answer.startswith(expected + "\n"):
            ran_on.append({**r, "why": f"ran on past the hidden text, stopped by '{r['stop_reason']}'"})
    return cut[: n // 2] + ran_on[: n - min(len(cut), n // 2)]


def first_line_cut(records: list[dict]) -> dict[str, dict]:
    """The single-line tasks scored again with each answer cut at its first line break: what a
    rule that ends single-line holes at the newline would score, beside the product's rules."""
    line = [r for r in records if r["kind"] == "line"]
    orders = tuple(dict.fromkeys(r["order"] for r in line))
    # The records are in the order `cases` builds them (a line's text alone may occur twice in a problem).
    ids = {r["task_id"] for r in line}
    line_cases = humaneval.cases([q for q in humaneval.load_problems() if q.task_id in ids], ("line",), orders)
    assert [(c.problem.task_id, c.order, c.expected) for c in line_cases] == [(r["task_id"], r["order"], r["expected"]) for r in line]
    answers = [humaneval.Answer(c, r["answer"].split("\n", 1)[0], r["stop_reason"], r["tokens"]) for c, r in zip(line_cases, line)]
    scores, _ = humaneval.score("first line", answers, 1.0)
    return {s.task_set: {"pass1": s.pass1, "exact": s.exact} for s in scores}


def markdown(result: dict) -> str:
    lines = [f"Stand-in: {result['training'].get('name')} — {result['training'].get('parameters', 0) / 1e6:.1f}M parameters, "
             f"{result['training'].get('tokens_seen', 0) / 1e6:.2f}M tokens seen, held-out loss "
             f"{(result['training'].get('curve') or [{}])[-1].get('held_out_loss')}, device {result['training'].get('device')}.", "",
             "| conversion | tokens | mean KL vs PyTorch | max KL | top-1 |", "|---|---|---|---|---|"]
    for name, f in result["fidelity"].items():
        lines.append(f"| {name} | {f['tokens']} | {f['mean_kl']:.2e} | {f['max_kl']:.2e} | {f['top1']:.1%} |")
    sets = [k for k in ("complete ", "line spm", "block spm", "line psm", "block psm") if any(k.strip() in q["humaneval"] for q in result["quants"])]
    lines += ["", "| quant | GiB | KL vs F16 | top-1 vs F16 | " + " | ".join(f"{s.strip()} pass@1" for s in sets)
              + " | line exact | block exact | tokens/s (tg) |", "|---" * (7 + len(sets)) + "|"]
    for q in result["quants"]:
        he = q["humaneval"]
        cells = [q["name"], f"{q['size_gib']:.3f}", f"{q['mean_kl']:.2e}" if q["mean_kl"] is not None else "—",
                 f"{q['top1']:.1%}" if q["top1"] is not None else "—"]
        cells += [f"{he[s.strip()]['pass1']:.1%}" if s.strip() in he else "—" for s in sets]
        cells += [f"{he[k]['exact']:.1%}" if k in he else "—" for k in ("line spm", "block spm")]
        cells.append(f"{q['tg_tps']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Stop rules on the canonical answers (a perfect model's answer, then the code that follows it):", ""]
    for kind, counts in result["stop_rule_fit"].items():
        total = sum(counts.values())
        lines.append(f"- {kind}: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in counts.items()))
    if result.get("first_line_cut"):
        he = next(q["humaneval"] for q in result["quants"] if q["name"] == "F16")
        lines += ["", "F16's single-line answers cut at their first line break, against the product's rules:", "",
                  "| task set | pass@1 (product's rules) | pass@1 (first line) | exact (rules) | exact (first line) |", "|---|---|---|---|---|"]
        for task_set, cut in result["first_line_cut"].items():
            lines.append(f"| {task_set} | {he[task_set]['pass1']:.1%} | {cut['pass1']:.1%} | {he[task_set]['exact']:.1%} | {cut['exact']:.1%} |")
    if result.get("examples"):
        lines += ["", "Where F16's answers and the hidden text part (the answer as the stop rules left it):"]
    for e in result.get("examples", []):
        lines += ["", f"- {e['task_id']} ({e['kind']}, {e['order']}): {e['why']}", "", "  hidden:", "", "  ```python",
                  *("  " + ln for ln in e["expected"].splitlines()), "  ```", "", "  answer:", "", "  ```python",
                  *("  " + ln for ln in e["answer"].splitlines()[:8]), *(["  …"] if e["answer"].count("\n") >= 8 else []), "  ```"]
    return "\n".join(lines) + "\n"


def _humaneval_job(name: str, path: str, n_problems: int | None, orders: tuple[str, ...], parallel: int,
                   threads: int | None, gpu_layers: str, test_parallel: int) -> tuple[str, dict[str, dict], list[dict]]:
    """One model's HumanEval, in a worker process of its own (models run side by side on one GPU)."""
    scores, records = humaneval.evaluate(Path(path), humaneval.load_problems()[:n_problems], humaneval.KINDS, orders,
                                         parallel, threads, gpu_layers, test_parallel=test_parallel)
    return name, {s.task_set: s.as_dict() for s in scores}, records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, help="checkpoint and GGUFs go here")
    p.add_argument("--out", type=Path, required=True, help="quality.json and quality.md; a run stopped part way "
                   "goes on from the quality.json it left here")
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint (skip training)")
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--minutes", type=float, default=0.0, help="training budget (see train_standin.py)")
    p.add_argument("--quants", default="all")
    p.add_argument("--problems", type=int, default=None, help="only the first N HumanEval problems")
    p.add_argument("--orders", default="spm,psm")
    p.add_argument("--parallel", type=int, default=1, help="HumanEval tasks at once per model (engine slots)")
    p.add_argument("--jobs", type=int, default=1, help="models evaluated at once, each in its own process")
    p.add_argument("--gpu-layers", default="0")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--render", action="store_true", help="only write quality.md again from --out's quality.json and samples")
    a = p.parse_args()
    if a.render:
        return render(a.out)
    if a.work is None:
        p.error("--work is required")
    a.out.mkdir(parents=True, exist_ok=True)
    report = a.out / "quality.json"

    ckpt = a.checkpoint or a.work / "checkpoint"
    if a.checkpoint is None and not (ckpt / "model.safetensors").is_file():
        log(f"training the stand-in ({a.steps} steps, budget {a.minutes or 'none'} min)")
        train(Settings(steps=a.steps, minutes=a.minutes), ckpt, default_sources(), log=log)
    result = json.loads(report.read_text()) if report.is_file() else {"fidelity": {}, "quants": [], "files": {}}
    result["training"] = json.loads((ckpt / "training.json").read_text()) if (ckpt / "training.json").is_file() else {}

    def save() -> None:
        report.write_text(json.dumps(result, indent=1))

    quants = catalog.load().select(a.quants)
    if not all(Path(f).is_file() for f in result["files"].values()) or not result["files"]:
        log("convert: F32 + quants, and F16")
        done = convert(ckpt, a.work / "gguf", "f32", quants, threads=a.threads)
        convert(ckpt, a.work / "gguf-f16", "f16", [], threads=a.threads)
        result["files"] = {"F32": str(next((a.work / "gguf").glob("*.F32.gguf"))),
                           "F16": str(next((a.work / "gguf-f16").glob("*.F16.gguf"))),
                           **{q.name: str(done.quants[q.name]) for q in quants}}
        save()
    files = {name: Path(f) for name, f in result["files"].items()}
    text = (Path(__file__).resolve().parents[1] / "refact_gguf" / "fim.py").read_text()  # code the stand-in never saw
    for name in ("F32", "F16"):
        if name not in result["fidelity"]:
            result["fidelity"][name] = fidelity(ckpt, files[name], text, threads=a.threads)
            log(f"fidelity {name}: {result['fidelity'][name]}")
            save()

    models = ["F16"] + [q.name for q in quants]
    entries = {q["name"]: q for q in result["quants"]}
    for name in models:
        entries.setdefault(name, {"name": name, "size_gib": files[name].stat().st_size / 2**30})
    result["quants"] = [entries[name] for name in models]
    if any("mean_kl" not in entries[name] for name in models[1:]):
        log("KL and top-1 against F16")
        for r in evaluate(files["F16"], [files[name] for name in models[1:]], threads=a.threads):
            entry = next(entries[n] for n in models[1:] if files[n].name == Path(r.model).name)
            entry.update(mean_kl=r.mean_kl, top1=r.top1_agreement)
        entries["F16"].update(mean_kl=None, top1=None)
        save()

    todo = [name for name in models if "humaneval" not in entries[name]]
    orders = tuple(a.orders.split(","))
    cpus = os.cpu_count() or 1
    log(f"HumanEval: {len(todo)} models, {a.jobs} at once")
    with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_humaneval_job, name, str(files[name]), a.problems, orders if name == "F16" else ("spm",),
                            a.parallel, max(1, (a.threads or cpus) // a.jobs), a.gpu_layers, max(1, cpus // a.jobs))
                for name in todo]
        for job in as_completed(jobs):
            name, scores, records = job.result()
            entries[name]["humaneval"] = scores
            if name == "F16":
                (a.out / "samples_f16.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
            log(f"HumanEval {name}: " + ", ".join(f"{k} {v['pass1']:.1%}" for k, v in entries[name]["humaneval"].items()))
            save()

    for name in models:  # timed one at a time, with nothing else running
        if "tg_tps" not in entries[name]:
            b = bench(files[name], a.threads, a.gpu_layers, 512, 128, 3, isolate=False)
            entries[name].update(pp_tps=b.pp_tps, tg_tps=b.tg_tps)
            save()
    result["stop_rule_fit"] = {k: dict(v) for k, v in humaneval.stop_rule_fit(humaneval.load_problems()[: a.problems]).items()}
    save()
    render(a.out)


def render(out: Path) -> None:
    """quality.md from quality.json, with what F16's answers (samples_f16.jsonl) say of the stop rules."""
    result = json.loads((out / "quality.json").read_text())
    samples = out / "samples_f16.jsonl"
    if samples.is_file():
        records = [json.loads(line) for line in samples.read_text().splitlines()]
        result["examples"] = examples(records)
        result["first_line_cut"] = first_line_cut(records)
        (out / "quality.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / "quality.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
