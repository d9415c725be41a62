"""Every method on the same prompts, side by side: tokens/s, tokens per forward, speed-up over plain decoding and
whether the tokens equal plain decoding's. What `python -m pass_ext bench` prints and `bench/bench_methods.py`
records; the full end-to-end matrix (Hugging Face rows, batch sizes, random-weight shapes) is
`bench/bench_generate.py`.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import torch

from .generate import generate

__all__ = ["DEFAULT_PROMPTS", "BENCH_METHODS", "check_methods", "compare_methods", "format_rows"]

# Two held-out-style code prompts and one English prompt.
DEFAULT_PROMPTS = [
    "def is_prime(n: int) -> bool:\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "import json\n\ndef load_config(path):\n    \"\"\"Read a JSON config file and return it as a dict.\"\"\"\n",
    "The three most important ideas in thermodynamics are",
]
# "pass-auto" is method="pass" with lookahead="auto"; "pass-tree-auto" method="pass-tree" with lookahead="auto".
BENCH_METHODS = ("ar", "pass", "pass-paper", "pass-auto", "pass-tree", "pass-tree-auto", "draft")
_AUTO = {"pass-auto": "pass", "pass-tree-auto": "pass-tree"}


def check_methods(methods: Sequence[str], has_draft_model: bool) -> None:
    """Raises ValueError unless `methods` are some of BENCH_METHODS, with a draft model for "draft"."""
    unknown = [m for m in methods if m not in BENCH_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(BENCH_METHODS)}, got {list(methods)}")
    if "draft" in methods and not has_draft_model:
        raise ValueError("method 'draft' needs a draft model")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compare_methods(model, prompts: Sequence, methods: Sequence[str] = ("ar", "pass", "pass-paper", "pass-auto"),
                    max_new_tokens: int = 64, repeats: int = 3, lookahead: Optional[int] = None,
                    draft_model=None, temperature: float = 0.0, top_k: int = 0, seed: int = 0,
                    progress: bool = True) -> list:
    """Runs each method on the same prompts (token-id lists or strings, one row each): one warm-up call (which
    captures the CUDA graphs), then `repeats` timed calls, EOS ignored so every call makes max_new_tokens per row.

    Returns one dict per method: method, k (what ran; auto's pick for "pass-auto"), draft_tree (the tree a
    "pass-tree" row ran, auto's pick for "pass-tree-auto"; else None), tokens_per_s and
    decode_tokens_per_s (medians over the repeats: all rows' new tokens over the call, and over the call without
    its prefill), tokens_per_forward, acceptance (per draft position), speedup (decode tokens/s over "ar"'s, when
    "ar" ran first) and same_tokens_as_ar (greedy only: every row's tokens equal "ar"'s; None when sampled or
    without an "ar" row)."""
    check_methods(methods, draft_model is not None)
    if any(m.startswith("pass") for m in methods) and model.lookahead is None:
        raise ValueError("methods pass, pass-paper, pass-auto, pass-tree and pass-tree-auto need look-ahead embeddings on the model "
                         "(pass_ext.load_lookahead or the CLI's --lookahead-file, or a model that ships them)")
    if int(repeats) < 1 or int(max_new_tokens) < 1:
        raise ValueError(f"repeats and max_new_tokens must be >= 1, got {repeats}, {max_new_tokens}")
    ids = [model.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(methods) * (int(repeats) + 1), desc="bench", unit="call", leave=False)
    rows, reference = [], None
    try:
        for method in methods:
            kw = dict(method=_AUTO.get(method, method), max_new_tokens=int(max_new_tokens),
                      eos_token_id=False, temperature=temperature, top_k=top_k, seed=seed)
            if method in _AUTO:
                kw["lookahead"] = "auto"
            elif method != "ar":
                kw["lookahead"] = lookahead  # None: generate's default (the embeddings' k; 4 for draft)
            if method == "draft":
                kw["draft_model"] = draft_model
            runs = []
            for i in range(int(repeats) + 1):
                _sync(model.device)
                t0 = time.perf_counter()
                out = generate(model, ids, **kw)
                _sync(model.device)
                wall = time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                if i:  # the first call is the warm-up
                    runs.append((wall, out))
            new = sum(int(n) for n in runs[-1][1].num_new_tokens)
            walls = [w for w, _ in runs]
            decode = [max(w - o.stats.prefill_s, 1e-9) for w, o in runs]
            out = runs[-1][1]
            row = dict(method=method, k=out.stats.k, draft_tree=out.stats.draft_tree,
                       tokens_per_s=new / statistics.median(walls),
                       decode_tokens_per_s=new / statistics.median(decode),
                       tokens_per_forward=out.stats.tokens_per_forward, acceptance=out.stats.acceptance_by_position,
                       speedup=None, same_tokens_as_ar=None)
            if method == "ar":
                reference = row, out
            elif reference is not None:
                row["speedup"] = row["decode_tokens_per_s"] / reference[0]["decode_tokens_per_s"]
                if temperature <= 0:
                    row["same_tokens_as_ar"] = all(a.tolist() == b.tolist()
                                                   for a, b in zip(out.new_tokens, reference[1].new_tokens))
            rows.append(row)
    finally:
        if bar is not None:
            bar.close()
    if reference is not None:
        reference[0]["speedup"] = 1.0
        if temperature <= 0:
            reference[0]["same_tokens_as_ar"] = True
    return rows


def format_rows(rows: list) -> str:
    """The rows as a text table."""
    lines = [f"{'method':14s} {'k':>2s} {'tok/s':>9s} {'decode tok/s':>13s} {'x ar':>6s} {'tok/fwd':>8s}  same as ar"]
    for r in rows:
        speed = f"{r['speedup']:.2f}" if r["speedup"] is not None else "-"
        same = {True: "yes", False: "no", None: "-"}[r["same_tokens_as_ar"]]
        tree = r.get("draft_tree")
        lines.append(f"{r['method']:14s} {r['k']:2d} {r['tokens_per_s']:9.1f} {r['decode_tokens_per_s']:13.1f} "
                     f"{speed:>6s} {r['tokens_per_forward']:8.2f}  {same}"
                     + (f"  tree: {len(tree)} nodes" if tree else ""))
    return "\n".join(lines)
