"""Draft trees of method="pass-tree" against `ar` and `pass` (fixed k and auto k) on a real model, in one run:
decode tokens/s, tokens per forward and speed-up over `ar`, per tree (depth k : nodes), batch and setting.

At B = 1 every held-out code prompt runs in its own call (one warm-up call per configuration captures the CUDA
graph; then `--repeats` passes over the prompts, timed per call with the prefill taken out), so tokens per
forward average over the prompts instead of coming from one. At B > 1 the first B prompts make one batch.
Greedy rows also report how many rows differ from `ar`'s tokens and how many of those are near-ties (the two tokens
within a few ulps at the first difference, bench_generate.divergence_ulps; float32 equality is a test).

    python bench/bench_tree.py --model qwen2.5-coder-1.5b --trees 1:1,1:3,1:7,2:2,2:5 --batches 1,8
    python bench/bench_tree.py --model smollm2-135m --device cpu --prompts 2 --new 8 --trees 1:3   # smoke run
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pass_ext  # noqa: E402
from bench_generate import NEAR_TIE_ULPS, SETTINGS, divergence_ulps, timed  # noqa: E402
from pass_ext import autotune, corpora, masks  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tree.json")


def configs(args) -> list:
    """(label, generate kwargs) of every row: ar, pass at --k, pass with auto k, pass-tree with auto (its tree
    picked per call), then each tree."""
    rows = [("ar", dict(method="ar")), (f"pass k={args.k}", dict(method="pass", lookahead=args.k)),
            ("pass auto", dict(method="pass", lookahead="auto")),
            ("tree auto", dict(method="pass-tree", lookahead="auto"))]
    for spec in args.trees.split(","):
        try:
            k, nodes = (int(x) for x in spec.split(":"))
        except ValueError:
            raise SystemExit(f"--trees takes comma-separated depth:nodes pairs such as 1:3,2:5, got {spec!r}") from None
        paths = masks.default_tree(k, nodes)
        rows.append((f"tree k={k} n={nodes} ({masks.tree_layout(paths, k).rows} rows)",
                     dict(method="pass-tree", lookahead=k, draft_tree=paths)))
    return rows


def measure(model, batches: list, kw: dict, repeats: int, new: int, seed: int) -> dict:
    """Decode seconds (median over repeats of the summed calls), new tokens and tokens per forward."""
    def call(ids):
        return pass_ext.generate(model, ids, max_new_tokens=new, eos_token_id=False, seed=seed, **kw)

    for ids in batches:  # warm-up: captures each shape's graph (and auto's step costs)
        call(ids)
    runs = []
    for _ in range(repeats):
        timed_calls = [timed(model.device, lambda: call(ids)) for ids in batches]
        runs.append(sum(t - out.stats.prefill_s for t, out in timed_calls))
    outs = [out for _, out in timed_calls]
    tokens = sum(int(o.num_new_tokens.sum()) for o in outs)
    forwards = sum(float(o.num_new_tokens.sum()) / o.stats.tokens_per_forward for o in outs)
    return dict(decode_s=statistics.median(runs), decode_s_runs=runs, tokens=tokens,
                tokens_per_forward=tokens / forwards, k=[o.stats.k for o in outs],
                trees=[o.stats.draft_tree for o in outs],
                new_tokens=[t.tolist() for o in outs for t in o.new_tokens])


def picks(r: dict) -> str:
    """What auto ran over the timed calls: k, or a tree as depth:nodes, with how many calls."""
    seen = collections.Counter(f"k={k}" if not tree else f"{max(len(p) for p in tree)}:{len(tree)}"
                               for k, tree in zip(r["k"], r["trees"]))
    return ", ".join(f"{what} x{n}" for what, n in sorted(seen.items()))


def plot(res: dict, path: str) -> None:
    """Speed-up over ar against tokens per forward, one panel per (batch, setting), a point per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["batch"], r["setting"]) for r in res["rows"]}, key=lambda p: (p[0], list(SETTINGS).index(p[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, sharey=True)
    for ax, (B, setting) in zip(axes[0], panels):
        for r in res["rows"]:
            if (r["batch"], r["setting"]) != (B, setting):
                continue
            tree = r["config"].startswith("tree")
            ax.scatter(r["tokens_per_forward"], r["speedup_vs_ar"], marker="o" if tree else "s",
                       color="tab:blue" if tree else "tab:gray")
            ax.annotate(r["config"].split(" (")[0], (r["tokens_per_forward"], r["speedup_vs_ar"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_title(f"{res['meta']['model']}, B={B}, {setting}", fontsize=9)
        ax.set_xlabel("tokens per forward")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("decode tokens/s ÷ ar")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--trees", default="1:1,1:3,1:7,2:2,2:5", help="comma-separated depth:nodes")
    ap.add_argument("--k", type=int, default=4, help="k of the fixed-k pass row")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--settings", default="greedy,T0.8/top-k10", help=f"some of {', '.join(SETTINGS)}")
    ap.add_argument("--prompts", type=int, default=8, help="held-out code prompts (HumanEval)")
    ap.add_argument("--prompts-file", default=None,
                    help="a JSON file with {'code': [...]} (or a bench_generate results file): its code prompts")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompts cut to their last N tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--report-only", action="store_true", help="plot --out again (a PNG next to it), measure nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        with open(args.out) as f:
            res = json.load(f)
        plot(res, os.path.splitext(args.out)[0] + ".png")
        return res
    settings = [s for s in args.settings.split(",") if s]
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r}: use some of {', '.join(SETTINGS)}")

    rows_to_run = configs(args)  # a bad --trees fails before the model loads
    model = pass_ext.load_model(args.model, device=args.device)
    if model.lookahead is None:
        raise SystemExit(f"{args.model} ships no look-ahead embeddings")
    tok = model.tokenizer
    if args.prompts_file:
        with open(args.prompts_file) as f:
            data = json.load(f)
        code = data.get("prompts", data)["code"][: args.prompts]
    else:
        code = corpora.humaneval_prompts()[: args.prompts]
    enc = [tok(t, add_special_tokens=False)["input_ids"][-args.prompt_tokens:] for t in code]
    rows = []
    for B in [int(b) for b in args.batches.split(",") if b]:
        batches = [[ids] for ids in enc] if B == 1 else [(enc * B)[:B]]
        for setting in settings:
            ref = None
            for label, kw in rows_to_run:
                r = measure(model, batches, {**kw, **SETTINGS[setting]}, args.repeats, args.new, args.seed)
                row = dict(config=label, batch=B, setting=setting, kwargs=dict(kw),
                           decode_tokens_per_s=r["tokens"] / r["decode_s"], **{k: v for k, v in r.items()
                                                                               if k != "new_tokens"})
                if ref is None:
                    ref = r
                row["speedup_vs_ar"] = row["decode_tokens_per_s"] / (ref["tokens"] / ref["decode_s"])
                if setting == "greedy":
                    row["rows_differing_from_ar"] = sum(a != b for a, b in zip(r["new_tokens"], ref["new_tokens"]))
                    ulps = divergence_ulps(model, [ids for b in batches for ids in b], r["new_tokens"],
                                           ref["new_tokens"]) if row["rows_differing_from_ar"] else []
                    row["near_ties"] = sum(u <= NEAR_TIE_ULPS for u in ulps)
                    row["max_tie_ulps"] = round(max(ulps), 2) if ulps else None
                rows.append(row)
                print(f"B={B} {setting:13s} {label:28s} {row['decode_tokens_per_s']:9.1f} tok/s  "
                      f"{row['speedup_vs_ar']:.3f}x ar  {row['tokens_per_forward']:.2f} tok/fwd"
                      + (f"  differ {row['rows_differing_from_ar']} (near-ties {row['near_ties']})"
                         if setting == "greedy" else "") + (f"  picks {picks(r)}" if "auto" in label else ""),
                      flush=True)
    dev = model.device
    meta = dict(model=args.model, device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                dtype=str(model.dtype), torch=torch.__version__, prompts=args.prompts, new_tokens=args.new,
                repeats=args.repeats, date=time.strftime("%Y-%m-%d"), command="python bench/bench_tree.py "
                + " ".join(argv if argv is not None else sys.argv[1:]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # What the auto rows decided from: the step costs measured per bucket, the rank profile and batch efficiencies
    # after the run (for reading a pick afterwards).
    costs = [dict(method=m, batch=b, context=c, sampled=smp, option=list(o) if isinstance(o, tuple) else o,
                  seconds=t) for (m, b, c, smp, o), t in model.__dict__.get("step_costs", {}).items()]
    auto = dict(step_costs=costs, rank_profile=model.lookahead.meta.get("rank_profile"),
                acceptance=model.lookahead.meta.get("acceptance"),
                batch_efficiency=[dict(kind=kind, setting=st, batch=b, efficiency=e)
                                  for kind, table in autotune.EFFICIENCY_TABLES.items()
                                  for (st, b), e in model.__dict__.get(table, {}).items()])
    res = dict(meta=meta, rows=rows, auto=auto)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.splitext(args.out)[0] + ".png")
    return res


if __name__ == "__main__":
    main()
