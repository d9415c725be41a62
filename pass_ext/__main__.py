"""Command line: `python -m pass_ext generate|train|bench ...` (see --help of each verb)."""
from __future__ import annotations

import argparse
import sys


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="short name (smollm2-135m, qwen2.5-coder-1.5b, qwen2.5-coder-0.5b), HF dir or .gguf file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")


class _TextStream:
    """Prints one row's tokens as text as they are committed (decoding the whole row keeps multi-byte
    characters intact)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, row: int, tokens: list) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def _lookahead_arg(value: str):
    """--lookahead: a number of drafts k (an int >= 1) or 'auto' (PaSS picks k per call, 0 included)."""
    if value == "auto":
        return value
    if value.strip().isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"takes an integer k >= 1 or 'auto', got {value!r}")


def cmd_generate(args) -> int:
    import torch

    import pass_ext
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = pass_ext.load_model(args.model, dtype=dtype, device=args.device)
    if args.lookahead_file:
        pass_ext.load_lookahead(model, args.lookahead_file)
    tok = model.tokenizer
    if tok is None:
        print("this model has no tokenizer; pass_ext generate needs one to encode --prompt", file=sys.stderr)
        return 2
    text = args.prompt
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                       add_generation_prompt=True)
    ids = tok(text, add_special_tokens=not args.chat)["input_ids"]
    draft = pass_ext.load_model(args.draft_model, dtype=dtype, device=args.device) if args.draft_model else None
    if not args.quiet:
        sys.stdout.write(args.prompt)
    out = pass_ext.generate(model, [ids], max_new_tokens=args.max_new_tokens, method=args.method,
                            lookahead=args.lookahead, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, draft_model=draft, draft_tree=args.draft_tree,
                            stream=None if args.quiet else _TextStream(tok))
    if args.quiet:
        sys.stdout.write(tok.decode(out.new_tokens[0], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    print()
    print(out.stats.summary() + f", stop: {out.stats.stop_reasons[0]}", file=sys.stderr)
    return 0


def _texts(spec: str) -> list:
    """Corpus names (see pass_ext.corpora) or text files/directories, comma separated."""
    import os

    from . import corpora
    out = []
    for item in filter(None, spec.split(",")):
        if item == "python-stdlib":
            out += corpora.python_stdlib()
        elif item == "shakespeare":
            out += [t for i, t in enumerate(corpora.shakespeare()) if i % 8 != 7]  # every 8th work is held out
        elif os.path.isdir(item):
            for root, _, files in os.walk(item):
                for f in sorted(files):
                    if f.endswith((".py", ".txt", ".md", ".rst")):
                        with open(os.path.join(root, f), encoding="utf-8", errors="replace") as fh:
                            out.append(fh.read())
        elif os.path.isfile(item):
            with open(item, encoding="utf-8", errors="replace") as fh:
                out.append(fh.read())
        else:
            raise ValueError(f"--data item {item!r} is neither a corpus name (python-stdlib, shakespeare) "
                             "nor an existing file or directory")
    return out


def cmd_train(args) -> int:
    import os

    import torch

    import pass_ext
    from . import corpora
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = pass_ext.load_model(args.model, dtype=dtype, device=args.device)
    init = None
    if os.path.exists(args.out):
        init = pass_ext.LookaheadEmbeddings.load(args.out, model)
        print(f"resuming from {args.out} ({init.meta.get('steps', 0)} steps so far)", file=sys.stderr)
    data = _texts(args.data)
    if args.self_generate:
        from .train import self_generated
        data = data + self_generated(model, data, args.self_generate,
                                    new_tokens=args.self_new_tokens, seed=args.seed)
    held = corpora.splits()
    eval_texts = held["eval_code"][: args.eval_docs] + [t[:4000] for t in held["eval_english"][:2]]
    la = pass_ext.train_lookahead(model, data, k=args.k, steps=args.steps, seq_len=args.seq_len,
                                  batch_size=args.batch_size, lr=args.lr, objective=args.objective,
                                  init=init, eval_data=eval_texts, eval_every=args.eval_every, seed=args.seed,
                                  on_eval=lambda step, result, snapshot: snapshot.save(args.out),
                                  time_limit=None if args.max_minutes is None else 60.0 * args.max_minutes)
    la.save(args.out)
    print(f"saved {la.k} look-ahead embeddings to {args.out}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import json

    import torch

    import pass_ext
    from .benchmark import DEFAULT_PROMPTS, check_methods, compare_methods, format_rows
    methods = [m for m in args.methods.split(",") if m]
    check_methods(methods, bool(args.draft_model))  # before the model loads
    if args.batch is not None and args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    if args.repeats < 1 or args.max_new_tokens < 1:
        raise ValueError(f"--repeats and --max-new-tokens must be >= 1, got {args.repeats}, {args.max_new_tokens}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = pass_ext.load_model(args.model, dtype=dtype, device=args.device)
    if args.lookahead_file:
        pass_ext.load_lookahead(model, args.lookahead_file)
    draft = pass_ext.load_model(args.draft_model, dtype=dtype, device=args.device) if args.draft_model else None
    if model.tokenizer is None:
        print("this model has no tokenizer; pass_ext bench needs one to encode the prompts", file=sys.stderr)
        return 2
    prompts = args.prompt or DEFAULT_PROMPTS
    if args.batch:
        prompts = [prompts[i % len(prompts)] for i in range(args.batch)]
    rows = compare_methods(model, prompts, methods, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                           lookahead=args.lookahead, draft_model=draft, temperature=args.temperature,
                           top_k=args.top_k, seed=args.seed, progress=not args.quiet)
    setting = "greedy" if args.temperature <= 0 else f"T={args.temperature:g}, top-k {args.top_k}"
    print(f"{args.model} on {model.device} ({str(model.dtype).replace('torch.', '')}), {len(prompts)} rows x "
          f"{args.max_new_tokens} new tokens, {setting}, median of {args.repeats} calls after a warm-up")
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, device=str(model.device), dtype=str(model.dtype), rows=len(prompts),
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           results=rows), f, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pass_ext", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--method", default="pass", choices=["ar", "pass", "pass-paper", "pass-tree", "draft"])
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--lookahead", type=_lookahead_arg, default=None,
                   help="drafts per step k, or 'auto': PaSS picks k per call from measured acceptance and step cost, "
                        "plain decoding included (its first call per shape times each k once; with --method "
                        "pass-tree it picks the tree's depth and nodes); default: the k the embeddings hold")
    g.add_argument("--lookahead-file", default=None, help="look-ahead embeddings (.safetensors) to load")
    g.add_argument("--draft-model", default=None, help="draft model for --method draft")
    g.add_argument("--draft-tree", type=int, default=None,
                   help="--method pass-tree: draft nodes (default: the likeliest paths that fill 8 rows)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--quiet", action="store_true", help="print the text at the end instead of streaming it")
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("train", help="train look-ahead embeddings for a model (resumes from --out if it exists)")
    _add_model_args(t)
    t.add_argument("--out", required=True, help="output .safetensors (resumed from when it exists)")
    t.add_argument("--data", default="python-stdlib,shakespeare",
                   help="comma-separated corpus names (python-stdlib, shakespeare) or text files/directories")
    t.add_argument("--k", type=int, default=8, help="look-ahead tokens to train")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--objective", default="ce", choices=["kl", "ce"])
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--eval-docs", type=int, default=16, help="held-out HumanEval prompts to evaluate on")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--self-generate", type=int, default=0, metavar="N",
                   help="also train on N sequences the model writes itself from prompts cut from --data")
    t.add_argument("--self-new-tokens", type=int, default=192, help="tokens per self-generated sequence")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    t.set_defaults(fn=cmd_train)

    b = sub.add_parser("bench", help="every method on the same prompts: tokens/s, tokens per forward, speed-up "
                                     "over ar, same tokens as ar")
    _add_model_args(b)
    b.add_argument("--methods", default="ar,pass,pass-paper,pass-auto",
                   help="comma-separated, from ar, pass, pass-paper, pass-auto (pass with lookahead='auto'), "
                        "pass-tree, pass-tree-auto (pass-tree with lookahead='auto'), draft")
    b.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: two code prompts and one English prompt)")
    b.add_argument("--batch", type=int, default=None, help="rows per call (the prompts repeated to fill them)")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3, help="timed calls per method, after one warm-up call")
    b.add_argument("--lookahead", type=int, default=None, help="drafts per step k (default: the embeddings' k; "
                                                                   "4 for draft)")
    b.add_argument("--lookahead-file", default=None, help="look-ahead embeddings (.safetensors) to load")
    b.add_argument("--draft-model", default=None, help="draft model for the draft method")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--top-k", type=int, default=0)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default=None, help="also write the rows to this JSON file")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=cmd_bench)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
