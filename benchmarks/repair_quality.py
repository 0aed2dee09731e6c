"""Issue #26's table: for every quant type, on the trained stand-in, three files against the float64
reference forward (convert/reference.py): *published* (uncentred, as llama.cpp's converter writes it,
then quantized), *repaired* (that file through `refact_gguf.repair`) and *faithful* (`convert`).
Mean KL and top-1 agreement over 384 tokens each of textwrap.py, heapq.py and difflib.py. Each pair
of files is quantized the same way (the code imatrix where the catalog says so).

    python benchmarks/repair_quality.py --standin ../shared/standin --out /tmp/repair [--quant Q8_0,Q6_K] [--json r.json]
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import numpy as np

from refact_gguf import catalog
from refact_gguf.convert import convert
from refact_gguf.convert.checkpoint import Checkpoint
from refact_gguf.convert.refact import plan
from refact_gguf.convert.reference import forward, kl_divergence
from refact_gguf.llama import Model, sequence_logits
from refact_gguf.repair import repair

FILES = ("textwrap.py", "heapq.py", "difflib.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--standin", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "standin")
    ap.add_argument("--out", type=Path, default=Path("/tmp/repair_quality"))
    ap.add_argument("--quant", default="all")
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    quants = [q for q in catalog.load().select(args.quant) if q.alias_of is None]  # aliases are the same bytes
    t0 = time.time()
    published = convert(args.standin, args.out / "published", "f16", quants, centre=False)
    faithful = convert(args.standin, args.out / "faithful", "f16", quants)
    print(f"converted and quantized both ways in {time.time() - t0:.0f} s", flush=True)
    ckpt = Checkpoint.open(args.standin)
    weights = {t.name: t for t in plan(ckpt, centre=False)}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    with Model(faithful.base, vocab_only=True) as vocab:
        texts = [vocab.tokenize((stdlib / f).read_text())[: args.tokens] for f in FILES]
    refs = [forward(lambda n: weights[n].read(0, weights[n].rows), ckpt.config, np.array(t))[0] for t in texts]

    def score(path: Path) -> dict:
        kls, tops = [], []
        for tokens, ref in zip(texts, refs):
            got = sequence_logits(path, tokens)
            kls.append(float(kl_divergence(ref, got).mean()))
            tops.append(float((ref.argmax(-1) == got.argmax(-1)).mean()))
        return {"kl": kls, "top1": tops}

    rows = []
    print("| type | published KL | repaired KL | faithful KL | repaired / faithful | published top-1 | repaired top-1 | faithful top-1 |")
    print("|---|---|---|---|---|---|---|---|")
    for q in quants:
        repaired = repair(published.quants[q.name], args.out / f"repaired.{q.name}.gguf", "measured")
        r = {"type": q.name, "published": score(published.quants[q.name]), "repaired": score(repaired),
             "faithful": score(faithful.quants[q.name])}
        rows.append(r)
        kl = {k: np.mean(r[k]["kl"]) for k in ("published", "repaired", "faithful")}
        top = {k: np.mean(r[k]["top1"]) for k in ("published", "repaired", "faithful")}
        print(f"| {q.name} | {kl['published']:.2e} | {kl['repaired']:.2e} | {kl['faithful']:.2e} | "
              f"{kl['repaired'] / kl['faithful']:.2f} | {top['published']:.1%} | {top['repaired']:.1%} | {top['faithful']:.1%} |", flush=True)
        repaired.unlink()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
