"""The end-to-end path in one call: a model (the real one if reachable, else a labelled synthetic
one built here: convert → quantize), then load → FIM → chat."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import catalog
from .errors import RefactGGUFError
from .progress import Progress
from .select import synthetic_path
from .convert.synthetic import SYNTHETIC_NAME, SyntheticSpec, write_checkpoint

# Small enough to build in seconds, the real architecture and tokenizer otherwise.
QUICK_SPEC = SyntheticSpec(n_layer=4, n_embd=512, n_head=8, seed=7)
EXAMPLE_PREFIX = 'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    '
EXAMPLE_SUFFIX = "\n\n\nprint(fibonacci(10))\n"
EXAMPLE_QUESTION = "How do I reverse a list in Python?"


@dataclass
class QuickstartModel:
    path: Path
    synthetic: bool
    why: str  # how this model was chosen


def synthetic_model(progress: Progress | None = None) -> Path:
    """Build (once) a small synthetic Refact model, converted and quantized to Q4_K_M."""
    from .convert import convert

    cat = catalog.load()
    quant = cat.get("Q4_K_M")
    path = synthetic_path()
    out = path.parent
    if not path.is_file():
        hf = write_checkpoint(out / "hf", QUICK_SPEC)
        convert(hf, out, "f16", [quant], progress=progress)
    return path


def choose_model(progress: Progress | None = None, offline: bool | None = None) -> QuickstartModel:
    from .hub import HubConfig, HubError, cached_quants, pull
    from .select import recommend

    cached = cached_quants()
    if cached:
        cat = catalog.load()
        best = min(cached, key=lambda n: cat.get(n).kld)
        return QuickstartModel(cached[best], False, f"the real model, {best}, already pulled")
    config = HubConfig.from_env(timeout=5.0, retries=2)
    if not (config.offline if offline is None else offline):
        name = recommend()[0].name
        try:
            return QuickstartModel(pull(name, config=config, progress=progress), False, f"the real model, {name}, just pulled")
        except (HubError, RefactGGUFError):
            why = f"the Hub ({config.endpoint}) is not reachable"
    else:
        why = "offline (HF_HUB_OFFLINE)"
    return QuickstartModel(synthetic_model(progress), True, f"{why}: a SYNTHETIC model ({SYNTHETIC_NAME})")
