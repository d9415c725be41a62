"""Soak test: many generate() calls on a real model (every method, greedy and sampled, ragged batches of varied
sizes, fixed seeds) checking that memory stays flat after warm-up, that calls repeat token for token, and that
greedy output of every method equals "ar" (asserted in float32; counted in bf16/fp16, where near-ties may differ).

    python bench/soak.py [--model smollm2-135m] [--draft-model M] [--tokens 100000] [--device cuda] [--dtype bfloat16]
    python bench/soak.py --device cpu --tokens 2000            # a small CPU run (batch sizes 1,3; 8-24 new tokens)

Writes bench/results/soak.json and soak.png; prints a table last; exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pass_ext  # noqa: E402

METHODS = ("ar", "pass", "pass-paper", "pass-tree", "draft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2 ** 20
# Prompts of both kinds the shipped embeddings were trained on; rows use random prefixes of them (ragged).
PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\n\ndef list_python_files(root):\n    \"\"\"Yield every .py file under root.\"\"\"\n",
    "class Stack:\n    \"\"\"A last-in first-out stack backed by a list.\"\"\"\n\n    def __init__(self):\n",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n    result = []\n",
    "import json\n\ndef load_config(path):\n    \"\"\"Read a JSON config file and return it as a dict.\"\"\"\n",
    "def is_palindrome(s: str) -> bool:\n",
    "The three most important ideas in thermodynamics are",
    "Once upon a time, in a small village by the sea, there lived",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The quick brown fox",
    "Photosynthesis is the process by which plants",
    "Here is a short list of tips for writing clear documentation:\n1.",
]


@dataclass
class Round:
    """One batch of prompts and settings, run once per method."""
    index: int
    prompts: list              # B token-id lists (ragged)
    max_new_tokens: int
    greedy: bool
    temperature: list          # per row
    top_k: list
    top_p: list
    seed: int
    eos: bool                  # stop rows at the model's EOS (else run every row to max_new_tokens)


def plan_round(rng: random.Random, index: int, pool: list, batch_sizes: list, new_tokens: tuple,
               warmup_rounds: int) -> Round:
    """Warm-up rounds visit every (batch size, greedy/sampled) pair at the largest shapes (full prompts, the most
    new tokens), so every later round fits the memory the warm-up reserved; later rounds are random."""
    if index < warmup_rounds:
        B = batch_sizes[index % len(batch_sizes)]
        greedy = (index // len(batch_sizes)) % 2 == 0
        longest = max(range(len(pool)), key=lambda i: len(pool[i]))
        prompts = [pool[longest]] + [pool[rng.randrange(len(pool))] for _ in range(B - 1)]
        max_new, eos = new_tokens[1], False
    else:
        B = rng.choice(batch_sizes)
        greedy = rng.random() < 0.5
        prompts = []
        for _ in range(B):
            p = pool[rng.randrange(len(pool))]
            prompts.append(p[: rng.randint(1, len(p))])
        max_new, eos = rng.randint(*new_tokens), rng.random() < 0.5
    if greedy:
        temperature, top_k, top_p = [0.0] * B, [0] * B, [1.0] * B
    else:  # per-row warps, some rows greedy within a sampled batch
        temperature = [rng.choice([0.0, 0.6, 0.8, 1.0, 1.3]) for _ in range(B)]
        top_k = [rng.choice([0, 1, 10, 50]) for _ in range(B)]
        top_p = [rng.choice([1.0, 0.95, 0.8]) for _ in range(B)]
    return Round(index, prompts, max_new, greedy, temperature, top_k, top_p, rng.getrandbits(31), eos)


def run_call(model, draft, method: str, r: Round, lookahead=None) -> pass_ext.GenerateOutput:
    return pass_ext.generate(model, r.prompts, method=method, max_new_tokens=r.max_new_tokens,
                             lookahead=None if method == "ar" else lookahead,
                             temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed,
                             eos_token_id=None if r.eos else False, draft_model=draft if method == "draft" else None)


# ---- what is measured after every call -------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident set size now (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def live_objects(cls) -> int:
    """Live instances of cls the garbage collector tracks (torch.cuda.CUDAGraph is a Python class, so tracked).
    type() rather than isinstance(): isinstance reads __class__, which some module proxies answer with a warning."""
    return sum(1 for o in gc.get_objects() if issubclass(type(o), cls))


def memory_now(device: torch.device, graph_cls) -> dict:
    gc.collect()  # unreachable cycles are not leaks; count what is really held
    m = dict(rss=rss_bytes(), graphs=live_objects(graph_cls) if graph_cls is not None else 0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        m.update(allocated=torch.cuda.memory_allocated(device), reserved=torch.cuda.memory_reserved(device),
                 peak_allocated=torch.cuda.max_memory_allocated(device))
        torch.cuda.reset_peak_memory_stats(device)
    return m


def flatness(values: list, warmup: int, tol_frac: float, tol_abs: float) -> dict:
    """Growth of a per-call series after warm-up: the largest later value minus the largest warm-up value, checked
    against max(tol_frac * that warm-up value, tol_abs); the least-squares slope per call is reported too."""
    before, after = values[:warmup], values[warmup:]
    if not before or not after:
        return dict(ok=True, growth=0, tolerance=tol_abs, slope_per_call=0.0, note="too few calls to judge")
    base = max(before)
    growth = max(after) - base
    n = len(after)
    mean_x, mean_y = (n - 1) / 2, sum(after) / n
    var = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(after)) / var if var else 0.0
    tol = max(tol_frac * base, tol_abs)
    return dict(ok=growth <= tol, baseline=base, growth=growth, tolerance=tol, slope_per_call=slope)


# ---- the soak --------------------------------------------------------------------------------------------------
def soak(model, *, prompts: list, draft=None, tokens: int = 100_000, methods=METHODS, batch_sizes=(1, 2, 3, 5, 8),
         new_tokens=(16, 96), seed: int = 0, lookahead=None, repro: int = 4, min_rounds_after_warmup: int = 2,
         tol_frac: float = 0.01, tol_mib: float = 4.0, rss_tol_mib: float = 64.0, progress: bool = True) -> dict:
    """Run rounds of generate() calls (each round: one batch, every method) until `tokens` new tokens were generated
    and at least `min_rounds_after_warmup` rounds followed the warm-up; return records, checks and a verdict.

    prompts: a pool of token-id lists; rows are random prefixes. draft: the draft model of "draft" (default: the
    model itself). lookahead: drafts per step (default: generate's). The memory tolerance is
    max(tol_frac * baseline, tol_mib) for the CUDA allocator's allocated/reserved bytes and
    max(tol_frac * baseline, rss_tol_mib) for RSS (the C heap keeps freed pages).
    """
    from tqdm.auto import tqdm

    methods = [m for m in methods if m not in ("pass", "pass-paper", "pass-tree") or model.lookahead is not None]
    draft = model if draft is None else draft
    device = model.device
    graph_cls = getattr(torch.cuda, "CUDAGraph", None)
    batch_sizes = sorted(set(batch_sizes))
    warmup_rounds = 2 * len(batch_sizes)
    rng = random.Random(seed)
    records, rounds, outputs = [], [], {}  # outputs[(round, method)] = list of per-row token lists
    total = 0
    bar = tqdm(total=tokens, unit="tok", desc="soak", disable=not progress)
    t_start = time.perf_counter()
    # Objects that exist now (the model, torch, transformers: hundreds of thousands) are left out of every later
    # collection and object scan, which then cost microseconds instead of most of a second per call.
    gc.collect()
    gc.freeze()
    try:
        while total < tokens or len(rounds) < warmup_rounds + min_rounds_after_warmup:
            r = plan_round(rng, len(rounds), prompts, batch_sizes, new_tokens, warmup_rounds)
            rounds.append(r)
            for method in methods:
                out = run_call(model, draft, method, r, lookahead)
                new = [t.tolist() for t in out.new_tokens]
                outputs[(r.index, method)] = new
                n = sum(len(t) for t in new)
                total += n
                rec = dict(call=len(records), round=r.index, method=method, batch=len(r.prompts), greedy=r.greedy,
                           new_tokens=n, seconds=out.stats.elapsed_s, tokens_per_forward=out.stats.tokens_per_forward,
                           warmup=r.index < warmup_rounds)
                del out  # measured with nothing of the call alive
                records.append({**rec, **memory_now(device, graph_cls)})
                bar.update(n)
    finally:
        gc.unfreeze()
        bar.close()
    wall = time.perf_counter() - t_start
    warm_calls = sum(rec["warmup"] for rec in records)

    checks = {}
    # Memory: flat after warm-up.
    series = ["rss", "graphs"] + (["allocated", "reserved"] if device.type == "cuda" else [])
    for key in series:
        values = [rec[key] for rec in records]
        if key == "graphs":
            checks[key] = flatness(values, warm_calls, 0.0, 0)
        else:
            checks[key] = flatness(values, warm_calls, tol_frac, (rss_tol_mib if key == "rss" else tol_mib) * MIB)

    # Reproducibility: re-run a few (round, method) pairs, greedy and sampled, and compare tokens exactly.
    later = [r for r in rounds if r.index >= warmup_rounds]
    picks = ([later[0], later[-1]] if later else []) + [r for r in later if not r.greedy][:max(repro - 2, 0)]
    picks = list({r.index: r for r in picks}.values())[:repro]
    repro_rows = []
    for i, r in enumerate(picks):
        method = methods[i % len(methods)]
        again = [t.tolist() for t in run_call(model, draft, method, r, lookahead).new_tokens]
        repro_rows.append(dict(round=r.index, method=method, greedy=r.greedy, same=again == outputs[(r.index, method)]))
    checks["reproducible"] = dict(ok=all(x["same"] for x in repro_rows), calls=repro_rows)

    # Greedy equality with "ar", row by row; the first differing position is kept for inspection.
    strict = model.dtype == torch.float32
    rows = differing = 0
    examples = []
    for r in rounds:
        if not r.greedy or "ar" not in methods:
            continue
        ref = outputs[(r.index, "ar")]
        for method in methods:
            if method == "ar":
                continue
            for b, (got, want) in enumerate(zip(outputs[(r.index, method)], ref)):
                rows += 1
                if got != want:
                    differing += 1
                    at = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
                    if len(examples) < 20:
                        examples.append(dict(round=r.index, method=method, row=b, first_difference_at=at))
    checks["greedy_equals_ar"] = dict(ok=differing == 0 or not strict, asserted=strict, rows_compared=rows,
                                      rows_differing=differing, examples=examples)

    per_method = {}
    for m in methods:
        mine = [rec for rec in records if rec["method"] == m]
        secs = sum(rec["seconds"] for rec in mine)
        per_method[m] = dict(calls=len(mine), tokens=sum(rec["new_tokens"] for rec in mine),
                             tokens_per_s=sum(rec["new_tokens"] for rec in mine) / secs if secs else 0.0)
    return dict(ok=all(c["ok"] for c in checks.values()), checks=checks, per_method=per_method, records=records,
                rounds=[{**{k: v for k, v in asdict(r).items() if k != "prompts"},
                         "prompt_lengths": [len(p) for p in r.prompts]} for r in rounds],
                calls=len(records), warmup_calls=warm_calls, tokens=total, seconds=wall,
                config=dict(methods=list(methods), batch_sizes=batch_sizes, new_tokens=list(new_tokens), seed=seed,
                            lookahead=lookahead, tokens_budget=tokens, tol_frac=tol_frac, tol_mib=tol_mib,
                            rss_tol_mib=rss_tol_mib, device=str(device), dtype=str(model.dtype)))


def write_json(result: dict, f) -> None:
    """Indented, except one line per call and per round (thousands of them)."""
    lists = ("records", "rounds")
    head = json.dumps({k: v for k, v in result.items() if k not in lists}, indent=1)
    f.write(head[:-2] + "".join(f',\n "{key}": [\n' + ",\n".join("  " + json.dumps(x) for x in result[key]) + "\n ]"
                                for key in lists) + "\n}\n")


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = result["records"]
    x = [r["call"] for r in recs]
    cuda = "allocated" in recs[0]
    fig, axes = plt.subplots(2 if cuda else 1, 1, figsize=(9, 6 if cuda else 3.5), sharex=True, squeeze=False)
    axes = axes[:, 0]
    if cuda:
        for key in ("allocated", "reserved", "peak_allocated"):
            axes[0].plot(x, [r[key] / MIB for r in recs], label=key, lw=1)
        axes[0].set_ylabel("CUDA memory after call (MiB)")
        axes[0].legend(loc="lower right")
    axes[-1].plot(x, [r["rss"] / MIB for r in recs], color="tab:red", lw=1, label="RSS")
    axes[-1].set_ylabel("RSS after call (MiB)")
    axes[-1].set_xlabel("generate() call")
    for ax in axes:
        ax.axvline(result["warmup_calls"] - 0.5, color="gray", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    c = result["config"]
    axes[0].set_title(f"soak: {result['tokens']} tokens in {result['calls']} calls, {c['device']} {c['dtype']} "
                      f"(dashed: end of warm-up)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(result: dict) -> str:
    c = result["checks"]
    lines = [f"\nsoak: {result['tokens']} new tokens in {result['calls']} calls ({result['warmup_calls']} warm-up), "
             f"{result['seconds']:.0f} s, {result['config']['device']} {result['config']['dtype']}",
             f"{'method':11s} {'calls':>6s} {'tokens':>8s} {'tokens/s':>9s}"]
    for m, s in result["per_method"].items():
        lines.append(f"{m:11s} {s['calls']:6d} {s['tokens']:8d} {s['tokens_per_s']:9.1f}")
    lines.append(f"{'check':18s} {'ok':5s} detail")
    for key in ("allocated", "reserved", "rss", "graphs"):
        if key in c:
            g = c[key]
            unit, scale = ("objects", 1) if key == "graphs" else ("MiB", MIB)
            lines.append(f"{key:18s} {str(g['ok']):5s} growth after warm-up {g['growth'] / scale:.2f} {unit} "
                         f"(tolerance {g['tolerance'] / scale:.2f}), "
                         f"slope {g['slope_per_call'] / scale:.4f} {unit}/call")
    rep = c["reproducible"]
    lines.append(f"{'reproducible':18s} {str(rep['ok']):5s} {sum(x['same'] for x in rep['calls'])} of "
                 f"{len(rep['calls'])} re-runs identical")
    eq = c["greedy_equals_ar"]
    lines.append(f"{'greedy == ar':18s} {str(eq['ok']):5s} {eq['rows_differing']} of {eq['rows_compared']} rows differ"
                 + ("" if eq["asserted"] else " (not asserted outside float32: near-ties)"))
    lines.append("PASS" if result["ok"] else "FAIL")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft-model", default=None, help="draft model of 'draft' (default: the model itself)")
    ap.add_argument("--lookahead-file", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tokens", type=int, default=100_000, help="new tokens to generate in all")
    ap.add_argument("--batch-sizes", default=None, help="default 1,2,3,5,8 (CPU: 1,3)")
    ap.add_argument("--new-tokens", default=None, help="min,max new tokens per call; default 16,96 (CPU: 8,24)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lookahead", type=int, default=None,
                    help="drafts per step (default: the embeddings' k; 4 for draft)")
    ap.add_argument("--repro", type=int, default=4, help="calls re-run to check they repeat exactly")
    ap.add_argument("--tolerance-mib", type=float, default=4.0, help="allowed growth of CUDA allocated/reserved")
    ap.add_argument("--rss-tolerance-mib", type=float, default=64.0)
    ap.add_argument("--tolerance-frac", type=float, default=0.01, help="or this fraction of the baseline, if larger")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak.json"))
    args = ap.parse_args()

    dtype = DTYPES[args.dtype] if args.dtype else None
    model = pass_ext.load_model(args.model, device=args.device, dtype=dtype)
    if args.lookahead_file:
        pass_ext.load_lookahead(model, args.lookahead_file)
    draft = pass_ext.load_model(args.draft_model, device=model.device, dtype=model.dtype) if args.draft_model else None
    pool = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    cpu = model.device.type == "cpu"  # smaller calls: a CPU forward of even a 135M model takes a good fraction of 1 s
    batch_sizes = args.batch_sizes or ("1,3" if cpu else "1,2,3,5,8")
    lo, hi = (int(v) for v in (args.new_tokens or ("8,24" if cpu else "16,96")).split(","))
    result = soak(model, prompts=pool, draft=draft, tokens=args.tokens, methods=args.methods.split(","),
                  batch_sizes=[int(b) for b in batch_sizes.split(",")], new_tokens=(lo, hi), seed=args.seed,
                  lookahead=args.lookahead, repro=args.repro, tol_frac=args.tolerance_frac,
                  tol_mib=args.tolerance_mib, rss_tol_mib=args.rss_tolerance_mib)
    result["config"].update(model=args.model, draft_model=args.draft_model or "(the model itself)",
                            torch=torch.__version__, build=pass_ext.build_info())
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        write_json(result, f)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(result, png)
    print(report(result))
    print(f"wrote {args.out} and {png}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
