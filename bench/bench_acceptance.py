"""Tokens per forward of PaSS with a model's look-ahead embeddings, on held-out code (HumanEval prompts) and
held-out English (Shakespeare works never trained on): fused and paper mode, greedy and T=0.8/top-k 10,
k = 2, 4, 6, 8. Acceptance depends on the model, not on the device, so this runs on a CPU too.

    python bench/bench_acceptance.py --model smollm2-135m [--lookahead-file F] [--prompts 8] [--new 64]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import pass_ext
from pass_ext import corpora

SETTINGS = {"greedy": dict(temperature=0.0), "T0.8/top-k10": dict(temperature=0.8, top_k=10)}
MODES = {"fused": "pass", "paper": "pass-paper"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lookahead-file", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompts", type=int, default=8, help="prompts per domain")
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--ks", default="2,4,6,8")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "acceptance.json"))
    args = ap.parse_args()

    model = pass_ext.load_model(args.model, device=args.device)
    if args.lookahead_file:
        pass_ext.load_lookahead(model, args.lookahead_file)
    if model.lookahead is None:
        raise SystemExit(f"{args.model} has no look-ahead embeddings: pass --lookahead-file")
    ks = [int(k) for k in args.ks.split(",")]
    measure(model, args.model, args.prompts, args.new, ks, args.out)


def measure(model, name: str, n_prompts: int, new: int, ks: list, out_path: str) -> list:
    """The table for `model` with the embeddings it holds; writes `out_path` (JSON) and prints the table."""
    tok = model.tokenizer
    held = corpora.splits()
    domains = {
        "code": held["eval_code"][:n_prompts],
        "english": corpora.english_prompts(held["eval_english"], n_prompts),
    }
    ks = [k for k in ks if k <= model.lookahead.k]
    rows = []
    for domain, texts in domains.items():
        ids = [tok(t, add_special_tokens=False)["input_ids"][-256:] for t in texts]
        for setting, kw in SETTINGS.items():
            for mode, method in MODES.items():
                for k in ks:
                    t0 = time.perf_counter()
                    out = pass_ext.generate(model, ids, method=method, lookahead=k, max_new_tokens=new,
                                            seed=0, eos_token_id=False, **kw)
                    rows.append(dict(domain=domain, setting=setting, mode=mode, k=k,
                                     tokens_per_forward=out.stats.tokens_per_forward,
                                     acceptance_by_position=out.stats.acceptance_by_position,
                                     seconds=time.perf_counter() - t0))
                    print(f"{domain:8s} {setting:13s} {mode:6s} k={k}: {out.stats.tokens_per_forward:.2f} tokens/forward",
                          flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    meta = dict(model=name, fingerprint=model.fingerprint, lookahead_meta=model.lookahead.meta,
                prompts=n_prompts, new_tokens=new, device=str(model.device), dtype=str(model.dtype))
    with open(out_path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)

    print(f"\ntokens per forward, {name}, {n_prompts} prompts x {new} new tokens per domain")
    print("domain   setting        mode   " + " ".join(f"k={k:<5d}" for k in ks))
    for domain in domains:
        for setting in SETTINGS:
            for mode in MODES:
                vals = [r["tokens_per_forward"] for r in rows
                        if (r["domain"], r["setting"], r["mode"]) == (domain, setting, mode)]
                print(f"{domain:8s} {setting:14s} {mode:6s} " + " ".join(f"{v:<7.2f}" for v in vals))
    return rows

if __name__ == "__main__":
    main()
