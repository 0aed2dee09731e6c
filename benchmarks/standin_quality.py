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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refact_gguf import catalog, humaneval  # noqa: E402
from refact_gguf.bench import bench  # noqa: E402
from refact_gguf.convert import convert  # noqa: E402
from refact_gguf.evaluate import evaluate  # noqa: E402
from scripts.train_standin import Settings, default_sources, fidelity, train  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def examples(records: list[dict], n: int = 6) -> list[dict]:
    """Answers of the best model that failed on an exact-length question: where a rule cut a
    right start short, and where the model ran on past the hidden text."""
    cut, ran_on = [], []
    for r in records:
        if r["kind"] == "complete" or r["exact"]:
            continue
        answer, expected = r["answer"].strip(), r["expected"].strip()
        if answer and expected.startswith(answer) and r["stop_reason"] in ("dedent", "blank line", "repeats suffix"):
            cut.append({**r, "why": f"cut short by '{r['stop_reason']}'"})
        elif answer.startswith(expected) and len(answer) > len(expected):
            ran_on.append({**r, "why": f"ran on past the hidden text, stopped by '{r['stop_reason']}'"})
    return cut[: n // 2] + ran_on[: n - min(len(cut), n // 2)]


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
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="checkpoint and GGUFs go here")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--checkpoint", type=Path, help="a trained checkpoint (skip training)")
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--quants", default="all")
    p.add_argument("--problems", type=int, default=None, help="only the first N HumanEval problems")
    p.add_argument("--orders", default="spm,psm")
    p.add_argument("--parallel", type=int, default=1, help="HumanEval tasks at once (engine slots)")
    p.add_argument("--gpu-layers", default="0")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    ckpt = a.checkpoint or a.work / "checkpoint"
    if a.checkpoint is None and not (ckpt / "model.safetensors").is_file():
        log(f"training the stand-in ({a.steps} steps)")
        train(Settings(steps=a.steps), ckpt, default_sources(), log=log)
    training = json.loads((ckpt / "training.json").read_text()) if (ckpt / "training.json").is_file() else {}
    quants = catalog.load().select(a.quants)
    gguf = a.work / "gguf"
    log("convert: F32 + quants, and F16")
    done = convert(ckpt, gguf, "f32", quants, threads=a.threads)
    convert(ckpt, a.work / "gguf-f16", "f16", [], threads=a.threads)
    f32 = next(gguf.glob("*.F32.gguf"))
    f16 = next((a.work / "gguf-f16").glob("*.F16.gguf"))
    text = (Path(__file__).resolve().parents[1] / "refact_gguf" / "fim.py").read_text()  # code the stand-in never saw
    result = {"training": training, "fidelity": {}, "quants": [], "stop_rule_fit": {}, "examples": []}
    for name, path in (("F32", f32), ("F16", f16)):
        result["fidelity"][name] = fidelity(ckpt, path, text, threads=a.threads)
        log(f"fidelity {name}: {result['fidelity'][name]}")

    models = [("F16", f16)] + [(q.name, done.quants[q.name]) for q in quants]
    kl = {Path(r.model).name: r for r in evaluate(f16, [m for _, m in models[1:]], threads=a.threads)} if quants else {}
    problems = humaneval.load_problems()[: a.problems]
    orders = tuple(a.orders.split(","))
    for name, path in models:
        log(f"HumanEval {name}")
        scores, records = humaneval.evaluate(path, problems, humaneval.KINDS, orders if name == "F16" else ("spm",),
                                             a.parallel, a.threads, a.gpu_layers)
        if name == "F16":
            result["examples"] = examples(records)
            (a.out / "samples_f16.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        b = bench(path, a.threads, a.gpu_layers, 512, 128, 3, isolate=False)
        q = kl.get(path.name)
        result["quants"].append({
            "name": name, "size_gib": path.stat().st_size / 2**30, "mean_kl": q.mean_kl if q else None,
            "top1": q.top1_agreement if q else None, "pp_tps": b.pp_tps, "tg_tps": b.tg_tps,
            "humaneval": {s.task_set: s.as_dict() for s in scores},
        })
        (a.out / "quality.json").write_text(json.dumps(result, indent=1))
    result["stop_rule_fit"] = {k: dict(v) for k, v in humaneval.stop_rule_fit(problems).items()}
    (a.out / "quality.json").write_text(json.dumps(result, indent=1))
    (a.out / "quality.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
