"""What the prompt's prefill costs in a generate call: eager chunks (PASS_EXT_PREFILL_GRAPHS=0) against chunks
replayed as CUDA graphs (the default), in one process on one GPU, the two alternating.

Per model, batch and prompt length: the prefill alone (`pass_ext.generate.prefill` into a cache of the size generate
would make, its graphs captured beforehand), the first call of a new padded length (eager chunk plus capture), and a
whole `generate` call (`ar`, --new tokens, greedy, no EOS) in each mode; medians of --repeats. Random-weight
presets, random prompts.

    python bench/bench_prefill.py --models smollm2-135m-random,qwen2.5-1.5b,llama-3.1-8b
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pass_ext  # noqa: E402
from pass_ext.presets import PRESETS, random_model  # noqa: E402

G = importlib.import_module("pass_ext.generate")  # the module (pass_ext.generate is the function)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prefill.json")


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def positive_ints(text: str) -> list:
    """argparse type: comma-separated integers >= 1."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = [0]
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers, comma-separated; got {text!r}")
    return values


def measure(model, B: int, length: int, new: int, repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, model.config.vocab_size, (B, length), generator=g).tolist()
    capacity = -(-(length + new + 2) // 128) * 128  # as generate sizes an `ar` call's cache
    cache = model.new_cache(B, capacity)
    graphs = G.PrefillGraphs()

    def once(use) -> None:
        cache.reset()
        G.prefill(model, cache, rows, 512, use)

    first = timed(lambda: once(graphs))  # eager chunks on the graphs' buffers, then the captures
    once(None)  # warm the eager path's kernels
    eager, replayed = [], []
    for _ in range(repeats):
        eager.append(timed(lambda: once(None)))
        replayed.append(timed(lambda: once(graphs)))
    calls = {}
    kw = dict(method="ar", max_new_tokens=new, eos_token_id=False)
    for mode in ("0", "1"):
        os.environ["PASS_EXT_PREFILL_GRAPHS"] = mode
        pass_ext.generate(model, rows, **kw)  # captures this mode's step (and chunks)
    for mode in ("0", "1") * repeats:
        os.environ["PASS_EXT_PREFILL_GRAPHS"] = mode
        calls.setdefault(mode, []).append(timed(lambda: pass_ext.generate(model, rows, **kw)))
    os.environ.pop("PASS_EXT_PREFILL_GRAPHS", None)
    G.release_workspace(model)
    med = statistics.median
    return dict(batch=B, prompt=length, graphs=len(graphs), first_call_ms=1e3 * first,
                eager_ms=1e3 * med(eager), graphs_ms=1e3 * med(replayed),
                call_eager_ms=1e3 * med(calls["0"]), call_graphs_ms=1e3 * med(calls["1"]))


def profile_chunks(model, B: int, length: int, top: int, seed: int) -> str:
    """The CUDA kernels of one eager prefill of B random prompts of `length` tokens under torch.profiler, summed per
    kernel name: the top `top` by time, per chunk (a replayed chunk runs the same kernels)."""
    from torch.profiler import ProfilerActivity, profile
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, model.config.vocab_size, (B, length), generator=g).tolist()
    cache = model.new_cache(B, -(-(length + 2) // 128) * 128)
    chunks = -(-(length - 1) // pass_ext.ops.CUDA_MAX_Q)
    G.prefill(model, cache, rows, 512)  # warm-up
    cache.reset()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        G.prefill(model, cache, rows, 512)
        torch.cuda.synchronize()
    totals: dict = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = totals.get(e.name[:90], (0.0, 0))
            totals[e.name[:90]] = (t + e.device_time, n + 1)
    lines = [f"B={B} prompt={length}: {chunks} chunks, kernels {sum(t for t, _ in totals.values()) / 1e3 / chunks:.3f} "
             f"ms per chunk", f"{'µs/chunk':>10} {'calls':>6} {'µs/call':>8}  kernel"]
    for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{t / chunks:10.1f} {n / chunks:6.1f} {t / n:8.1f}  {name}")
    return "\n".join(lines)


def table(rows: list) -> str:
    lines = ["| model | B | prompt | prefill eager ms | graphs ms | × | first call ms | call eager ms | graphs ms "
             "| × |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['eager_ms']:.2f} | {r['graphs_ms']:.2f} | "
                     f"{r['eager_ms'] / r['graphs_ms']:.2f} | {r['first_call_ms']:.1f} | {r['call_eager_ms']:.2f} | "
                     f"{r['call_graphs_ms']:.2f} | {r['call_eager_ms'] / r['call_graphs_ms']:.2f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m-random,qwen2.5-1.5b,llama-3.1-8b",
                    help=f"random-weight presets, comma-separated: {', '.join(PRESETS)}")
    ap.add_argument("--batches", type=positive_ints, default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--prompts", type=positive_ints, default="32,150,500",
                    help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--new", type=int, default=32, help="new tokens of the whole generate calls")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of each mode, alternating")
    ap.add_argument("--profile", type=int, default=0,
                    help="also print the top N CUDA kernels of an eager prefill, per model at the first batch and the "
                         "last prompt length (0: off)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    if min(args.new, args.repeats) < 1:
        ap.error(f"--new and --repeats must be >= 1, got {args.new} and {args.repeats}")
    if args.profile < 0:
        ap.error(f"--profile must be >= 0 (0: off), got {args.profile}")
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in PRESETS]
    if unknown or not args.models:
        ap.error(f"--models: unknown presets {unknown}; known: {', '.join(PRESETS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not (torch.cuda.is_available() and pass_ext.ops.has_cuda_kernels()):
        raise SystemExit("bench_prefill.py needs a CUDA GPU and the extension's CUDA kernels")
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, argv=sys.argv[1:], rows=[])
    for name in args.models:
        model = random_model(name, device="cuda", dtype=torch.bfloat16)
        for B in args.batches:
            for length in args.prompts:
                row = dict(model=name, **measure(model, B, length, args.new, args.repeats, seed=B * 1000 + length))
                res["rows"].append(row)
                print(table([row]).splitlines()[-1], flush=True)
        if args.profile:
            print(f"{name} " + profile_chunks(model, args.batches[0], args.prompts[-1], args.profile, seed=1), flush=True)
        del model
        torch.cuda.empty_cache()
    print(table(res["rows"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(args.out)
    return res


if __name__ == "__main__":
    main()
