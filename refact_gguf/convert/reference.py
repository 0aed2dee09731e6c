"""A numpy forward pass of GPTRefactForCausalLM, written from the HF architecture.

LayerNorm without bias, multi-query attention with ALiBi (Refact's slopes, max bias 8), SwiGLU,
separate head. Used as the float64 reference the converted GGUF is checked against, and (float32)
to collect the activation statistics of the importance matrix. Weights are fetched layer by layer,
so a full-size model never has to be in memory at once.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .checkpoint import RefactConfig

Weights = Callable[[str], np.ndarray]  # llama.cpp tensor name → array, rows = output dim


class ActivationStats:
    """Σx² per input column of every weight matrix, over all tokens seen (llama.cpp's imatrix)."""

    def __init__(self) -> None:
        self.sum_sq: dict[str, np.ndarray] = {}
        self.count: dict[str, int] = {}

    def add(self, names: tuple[str, ...], x: np.ndarray) -> None:
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        sq = np.einsum("ij,ij->j", flat, flat)
        for name in names:
            self.sum_sq[name] = self.sum_sq.get(name, 0) + sq
            self.count[name] = self.count.get(name, 0) + flat.shape[0]


def alibi_slopes(n_head: int, max_bias: float = 8.0) -> np.ndarray:
    """Refact's slopes: m0^(h+1) with m0 = 2^(-max_bias / n_head)."""
    return (2.0 ** (-max_bias / n_head)) ** np.arange(1, n_head + 1)


def layer_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def forward(
    weights: Weights,
    cfg: RefactConfig,
    tokens: np.ndarray,
    dtype=np.float64,
    stats: ActivationStats | None = None,
    logits: bool = True,
) -> np.ndarray | None:
    """Logits [batch, seq, vocab] for token ids [batch, seq] (or [seq]); None with logits=False."""
    tokens = np.atleast_2d(np.asarray(tokens))
    B, T = tokens.shape
    H, D = cfg.n_head, cfg.head_dim

    def W(name: str) -> np.ndarray:
        return weights(name).astype(dtype, copy=False)

    h = W("token_embd.weight")[tokens]
    pos = np.arange(T)
    distance = (pos[:, None] - pos[None, :]).astype(dtype)  # i - j
    mask = np.where(pos[None, :] > pos[:, None], -np.inf, 0.0).astype(dtype)
    bias = -alibi_slopes(H).astype(dtype)[:, None, None] * distance + mask  # [H, T, T]

    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        x = layer_norm(h, W(p + "attn_norm.weight"), cfg.eps)
        if stats:
            stats.add((p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"), x)
        q = (x @ W(p + "attn_q.weight").T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = x @ W(p + "attn_k.weight").T  # [B, T, D]: one KV head
        v = x @ W(p + "attn_v.weight").T
        scores = q @ k[:, None].transpose(0, 1, 3, 2) / np.sqrt(D) + bias
        scores -= scores.max(-1, keepdims=True)
        prob = np.exp(scores)
        prob /= prob.sum(-1, keepdims=True)
        attn = (prob @ v[:, None]).transpose(0, 2, 1, 3).reshape(B, T, H * D)
        if stats:
            stats.add((p + "attn_output.weight",), attn)
        h = h + attn @ W(p + "attn_output.weight").T

        x = layer_norm(h, W(p + "ffn_norm.weight"), cfg.eps)
        if stats:
            stats.add((p + "ffn_gate.weight", p + "ffn_up.weight"), x)
        act = _silu(x @ W(p + "ffn_gate.weight").T) * (x @ W(p + "ffn_up.weight").T)
        if stats:
            stats.add((p + "ffn_down.weight",), act)
        h = h + act @ W(p + "ffn_down.weight").T

    x = layer_norm(h, W("output_norm.weight"), cfg.eps)
    if stats:
        stats.add(("output.weight",), x)
    return x @ W("output.weight").T if logits else None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(ref ‖ other) per position, in nats."""
    lp, lq = log_softmax(ref_logits.astype(np.float64)), log_softmax(logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(-1)
