"""Make the look-ahead embeddings shipped in pass_ext/data/ (one GPU run), and choose the default training
objective by measured acceptance.

    # 1. KL vs CE on SmolLM2, same data and budget; the one with more tokens per forward (fused mode,
    #    held-out code + English, greedy + T0.8/top-k 10) wins and is written as <fingerprint>.safetensors
    python tools/train_shipped.py compare --model smollm2-135m --out OUTDIR
    # 2. Any model with the chosen objective
    python tools/train_shipped.py train --model qwen2.5-coder-1.5b --objective kl --out OUTDIR

Both write OUTDIR/<fingerprint>.safetensors (with the measured acceptance by position in its metadata, the
first guess of lookahead="auto") and OUTDIR/train_<model>.json (settings, held-out history, acceptance).
Training data: the Python standard library and the Shakespeare works not held out, plus text the model
writes itself from prompts cut out of them; evaluation: HumanEval prompts and the held-out Shakespeare works.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import pass_ext
from pass_ext import corpora
from pass_ext.lookahead import LookaheadEmbeddings
from pass_ext.train import self_generated, train_lookahead

SETTINGS = {"greedy": dict(temperature=0.0), "T0.8/top-k10": dict(temperature=0.8, top_k=10)}


def held_out_prompts(model, n: int) -> dict:
    held = corpora.splits()
    tok = model.tokenizer
    texts = {"code": held["eval_code"][-n:],  # the trainer evaluates on the first HumanEval prompts
             "english": corpora.english_prompts(held["eval_english"], n)}
    return {d: [tok(t, add_special_tokens=False)["input_ids"][-256:] for t in ts] for d, ts in texts.items()}


def acceptance(model, prompts: dict, k: int, new: int) -> dict:
    """Fused-mode tokens per forward and acceptance by position per (domain, setting)."""
    out = {}
    for domain, ids in prompts.items():
        for setting, kw in SETTINGS.items():
            res = pass_ext.generate(model, ids, method="pass", lookahead=k, max_new_tokens=new, seed=0,
                                    eos_token_id=False, **kw)
            out[f"{domain}/{setting}"] = dict(tokens_per_forward=res.stats.tokens_per_forward,
                                              acceptance_by_position=res.stats.acceptance_by_position)
            print(f"  {domain:8s} {setting:13s} k={k}: {res.stats.tokens_per_forward:.2f} tokens/forward", flush=True)
    return out


def train_one(model, data, eval_texts, args, objective: str, minutes: float):
    init = LookaheadEmbeddings.load(args.init, model) if args.init else None
    return train_lookahead(model, data, k=args.k, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                           lr=args.lr, objective=objective, init=init, eval_data=eval_texts,
                           eval_every=args.eval_every, seed=0, time_limit=60.0 * minutes)


def finish(model, la, meas: dict, out_dir: str) -> str:
    """Store the measured acceptance (greedy and sampled, averaged over domains) and save by fingerprint."""
    for setting, key in (("greedy", "greedy"), ("T0.8/top-k10", "sampled")):
        rows = [v["acceptance_by_position"] for name, v in meas.items() if name.endswith(setting)]
        la.meta.setdefault("acceptance", {})[key] = [sum(r[i] for r in rows) / len(rows) for i in range(la.k)]
    path = os.path.join(out_dir, f"{model.fingerprint}.safetensors")
    la.save(path)
    print(f"saved {path}", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["compare", "train"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--objective", default="ce", choices=["kl", "ce"], help="for the train stage")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--minutes", type=float, default=3.0, help="training time per objective")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--self-generate", type=int, default=1024)
    ap.add_argument("--self-repeat", type=int, default=1,
                    help="each self-generated sequence counts this many times in the draw (its share of the batches)")
    ap.add_argument("--init", default=None, help="embeddings file to resume from (the train stage)")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts per domain for the acceptance")
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--table", default=None, metavar="JSON",
                    help="then measure the k = 2, 4, 6, 8 fused/paper table (bench/bench_acceptance.py) with the "
                         "chosen embeddings, in the same process, and write it here")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    t0 = time.perf_counter()
    model = pass_ext.load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    model.lookahead = None  # train from scratch, whatever ships
    print(f"loaded {args.model} ({model.fingerprint}) in {time.perf_counter() - t0:.0f} s", flush=True)
    split = corpora.splits()
    texts = split["train"]
    t0 = time.perf_counter()
    data = texts + self_generated(model, texts, args.self_generate, seed=1) * args.self_repeat \
        if args.self_generate else texts
    print(f"self-generated {args.self_generate} sequences in {time.perf_counter() - t0:.0f} s", flush=True)
    eval_texts = split["eval_code"][:16] + [t[:4000] for t in split["eval_english"][:2]]
    prompts = held_out_prompts(model, args.prompts)
    report = dict(model=args.model, fingerprint=model.fingerprint, settings=vars(args), runs={})

    objectives = ["kl", "ce"] if args.stage == "compare" else [args.objective]
    results = {}
    for obj in objectives:
        t0 = time.perf_counter()
        la = train_one(model, data, eval_texts, args, obj, args.minutes)
        seconds = time.perf_counter() - t0
        model.lookahead = la.to(model.device)
        print(f"{obj}: {la.meta['steps']} steps in {seconds:.0f} s; held-out acceptance:", flush=True)
        meas = acceptance(model, prompts, la.k, args.new)
        score = sum(v["tokens_per_forward"] for v in meas.values()) / len(meas)
        results[obj] = (score, la, meas)
        report["runs"][obj] = dict(steps=la.meta["steps"], seconds=seconds, history=la.meta.get("history"),
                                   acceptance=meas, mean_tokens_per_forward=score)
    best = max(results, key=lambda o: results[o][0])
    report["chosen"] = best
    score, la, meas = results[best]
    model.lookahead = None
    report["path"] = os.path.basename(finish(model, la.cpu(), meas, args.out))
    name = args.model.replace("/", "_")
    with open(os.path.join(args.out, f"train_{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"chosen objective: {best} ({score:.3f} mean tokens per forward)", flush=True)
    if args.table:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "bench_acceptance", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench",
                                             "bench_acceptance.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        model.lookahead = la.to(model.device)
        bench.measure(model, args.model, args.prompts, args.new, [2, 4, 6, 8], args.table)


if __name__ == "__main__":
    main()
