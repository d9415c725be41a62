"""Tokens per forward (and tokens/s on this machine) of every method on a few real prompts, greedy, with a
check that every method's tokens equal plain decoding's (pass_ext.benchmark, one timed call after a warm-up;
`python -m pass_ext bench` is the same with more options). Runs on CPU or GPU.

    python bench/bench_methods.py --model smollm2-135m [--draft-model M] [--new 48]
"""
from __future__ import annotations

import argparse
import json
import os

import pass_ext
from pass_ext.benchmark import DEFAULT_PROMPTS, compare_methods, format_rows


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
    methods = ["ar"] + (["pass", "pass-paper"] if model.lookahead is not None else []) + (["draft"] if draft else [])
    rows = compare_methods(model, DEFAULT_PROMPTS, methods, max_new_tokens=args.new, repeats=1, lookahead=args.k,
                           draft_model=draft)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(model=args.model, draft_model=args.draft_model, device=str(model.device),
                       dtype=str(model.dtype), new_tokens=args.new, prompts=len(DEFAULT_PROMPTS), rows=rows), f,
                  indent=1)
    print(f"\n{args.model} on {model.device} ({model.dtype}), {len(DEFAULT_PROMPTS)} prompts x {args.new} tokens, "
          "greedy")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
