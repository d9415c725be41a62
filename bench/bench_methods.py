"""Tokens per forward (and tokens/s on this machine) of every method on a few real prompts, greedy, with a
check that every method's tokens equal plain decoding's. Runs on CPU or GPU.

    python bench/bench_methods.py --model smollm2-135m [--draft-model M] [--new 48]
"""
from __future__ import annotations

import argparse
import json
import os

import pass_ext

PROMPTS = [
    "def is_prime(n: int) -> bool:\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
    "import json\n\ndef load_config(path):\n    \"\"\"Read a JSON config file and return it as a dict.\"\"\"\n",
    "The three most important ideas in thermodynamics are",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft-model", default=None, help="for the 'draft' row, e.g. qwen2.5-coder-0.5b")
    ap.add_argument("--lookahead-file", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--k", type=int, default=None, help="drafts per step (default: the embeddings' k; 4 for draft)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "methods.json"))
    args = ap.parse_args()

    model = pass_ext.load_model(args.model, device=args.device)
    if args.lookahead_file:
        pass_ext.load_lookahead(model, args.lookahead_file)
    draft = pass_ext.load_model(args.draft_model, device=args.device) if args.draft_model else None
    ids = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    methods = ["ar"] + (["pass", "pass-paper"] if model.lookahead is not None else []) + (["draft"] if draft else [])
    rows, ref = [], None
    for method in methods:
        k = args.k if method != "ar" else None
        out = pass_ext.generate(model, ids, method=method, lookahead=k, max_new_tokens=args.new,
                                draft_model=draft if method == "draft" else None, eos_token_id=False)
        if ref is None:
            ref = out
        same = all(out.new_tokens[b].tolist() == ref.new_tokens[b].tolist() for b in range(len(ids)))
        rows.append(dict(method=method, k=out.stats.k, tokens_per_forward=out.stats.tokens_per_forward,
                         tokens_per_s=out.stats.tokens_per_s, acceptance=out.stats.acceptance_by_position,
                         same_tokens_as_ar=same))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, draft_model=args.draft_model, device=str(model.device),
                       dtype=str(model.dtype), new_tokens=args.new, prompts=len(PROMPTS), rows=rows), f, indent=1)
    print(f"\n{args.model} on {model.device} ({model.dtype}), {len(PROMPTS)} prompts x {args.new} tokens, greedy")
    print(f"{'method':11s} {'k':>2s} {'tokens/forward':>15s} {'tokens/s':>9s}  same as ar")
    for r in rows:
        print(f"{r['method']:11s} {r['k']:2d} {r['tokens_per_forward']:15.2f} {r['tokens_per_s']:9.1f}  "
              f"{r['same_tokens_as_ar']}")


if __name__ == "__main__":
    main()
