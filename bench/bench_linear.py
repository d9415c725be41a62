"""How fast are a decode step's projections through decode_linear, against torch's linear (cuBLAS) in the same
run, on real models' shapes?

Two measurements per (model, rows M):
  - per call: each projection alone (qkv with the rotary embedding, o, gate_up with SwiGLU, down, lm_head),
    median of --iters CUDA-event timings with L2 flushed before each; the baselines for qkv and gate_up are
    F.linear plus the model's compiled rope / SwiGLU chain (what a forward runs without the op). Effective
    TB/s = weight + x + out bytes / time.
  - per layer: one CUDA graph that runs the qkv (+RMSNorm, rope), o (+residual), gate_up (+RMSNorm, SwiGLU) and
    down (+residual) projections of every layer of the model as a small model's decode forward does (against
    torch's linear with the model's compiled norm / rope / SwiGLU / add+norm chains), distinct weights per
    layer so that L2 holds what a real step's L2 would, replayed --iters times; µs per layer = median replay /
    layers. This includes the gaps between kernels inside a graph.

    python bench/bench_linear.py [--models smollm2-135m,qwen2.5-1.5b,llama3-8b] [--rows 1,4,8,16,25,32]
                                 [--iters N] [--tag T] [--norm]
--models also takes qwen2.5-14b (a 14B shape: 48 layers of distinct weights, about 29 GB on the GPU).
--norm: the per-call qkv and gate_up fuse the RMSNorm of x, as the model's forward does when every projection of a
layer runs as decode_linear (baselines: the model's compiled norm chain, then the same as without).
Writes bench/results/linear[_tag].json; prints the table last. bf16, random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOFLINE_TBPS = 4.24
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# name: (d, Hq, Hkv, D, intermediate, layers, vocab)
MODELS = {
    "smollm2-135m": (576, 9, 3, 64, 1536, 30, 49152),
    "qwen2.5-1.5b": (1536, 12, 2, 128, 8960, 28, 151936),
    "llama3-8b": (4096, 32, 8, 128, 14336, 32, 128256),
    "qwen2.5-14b": (5120, 40, 8, 128, 13824, 48, 152064),
}


def shapes(name: str) -> dict:
    d, hq, hkv, dh, inter, _, vocab = MODELS[name]
    return {"qkv": ((hq + 2 * hkv) * dh, d, False), "o": (d, hq * dh, False), "gate_up": (2 * inter, d, True),
            "down": (d, inter, False), "lm_head": (vocab, d, False)}


def rope_inputs(D: int, M: int, dev: str):
    """The model's float32 rope tables (4096 positions) and M random positions."""
    inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2, device=dev).float() / D)
    freqs = torch.outer(torch.arange(4096, device=dev).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin(), torch.randint(0, 4096, (M,), device=dev)


def timed(fn, iters: int, flush: torch.Tensor) -> float:
    """Median µs of `iters` CUDA-event timed calls, L2 flushed (256 MB read) before each."""
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        flush.sum()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def graph_us(fn, iters: int) -> float:
    """Median µs of `iters` replays of a CUDA graph of fn (each replay timed alone)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        graph.replay()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-1.5b,llama3-8b",
                    help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument("--rows", default="1,4,8,16,25,32", help="rows of x (B x Q), at most 32")
    ap.add_argument("--iters", type=int, default=50, help="timed runs per measurement")
    ap.add_argument("--tag", default=None, help="suffix of the output file")
    ap.add_argument("--norm", action="store_true",
                    help="per call, fuse the RMSNorm into qkv and gate_up (baselines: the compiled norm chain first)")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            sys.exit(f"--models: unknown model {m!r}; choose from {', '.join(MODELS)}")
    rows_list = [int(r) for r in args.rows.split(",") if r]
    if any(not 1 <= r <= 32 for r in rows_list):
        sys.exit(f"--rows must be integers in [1, 32], got {args.rows!r}")
    if not torch.cuda.is_available():
        sys.exit("bench_linear.py measures CUDA kernels and needs a GPU; none is visible.")
    from pass_ext import ops
    from pass_ext import model as model_module
    if not ops.has_cuda_kernels():
        sys.exit("pass_ext was built without CUDA kernels; rebuild on the GPU machine.")
    swiglu_chain = model_module._chain("swiglu", True)
    rope_chain = model_module._chain("rope", True)
    norm_chain = model_module._chain("norm", True)
    add_norm_chain = model_module._chain("add_norm", True)
    dtype, dev = torch.bfloat16, "cuda"
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    results = []
    t0 = time.monotonic()
    for name in models:
        sh = shapes(name)
        weights = {p: torch.randn(n, k, generator=g, device=dev, dtype=dtype) / k ** 0.5 for p, (n, k, _) in sh.items()}
        layers = MODELS[name][5]
        stack = [{p: torch.randn(n, k, generator=g, device=dev, dtype=dtype) / k ** 0.5
                  for p, (n, k, _) in sh.items() if p != "lm_head"} for _ in range(layers)]
        for M in rows_list:
            row = {"model": name, "M": M, "calls": {}}
            _, hq, hkv, dh = MODELS[name][:4]
            cos_t, sin_t, pos = rope_inputs(dh, M, dev)
            cos, sin = (t[pos].to(dtype)[:, None] for t in (cos_t, sin_t))  # what the model hands the rope chain

            def rope_base(x, w):
                q, k, v = F.linear(x, w).split([hq * dh, hkv * dh, hkv * dh], dim=-1)
                return rope_chain(q.view(M, hq, dh), k.view(M, hkv, dh), cos, sin)

            for p, (n, k, sw) in sh.items():
                x = torch.randn(M, k, generator=g, device=dev, dtype=dtype)
                w = weights[p]
                # --norm: the RMSNorm of x inside the op (qkv, gate_up), before torch's linear in the baseline.
                normed = args.norm and p in ("qkv", "gate_up")
                nwk = (1 + 0.2 * torch.randn(k, generator=g, device=dev)).to(dtype) if normed else None
                fused = dict(norm_weight=nwk, eps=1e-5) if normed else {}
                pre = (lambda t, nwk=nwk: norm_chain(t, nwk, 1e-5)) if normed else (lambda t: t)
                if p == "qkv":
                    ours = lambda: ops.decode_linear(x, w, rope_cos=cos_t, rope_sin=sin_t, positions=pos,  # noqa: E731
                                                     rope_rows=(hq + hkv) * dh, **fused)
                    base = lambda: rope_base(pre(x), w)  # noqa: E731
                    check = lambda: (ours()[:, : hq * dh].float() - base()[0].reshape(M, -1).float())  # noqa: E731
                else:
                    ours = lambda: ops.decode_linear(x, w, swiglu=sw, **fused)  # noqa: E731
                    base = ((lambda: swiglu_chain(F.linear(pre(x), w))) if sw  # noqa: E731
                            else (lambda: F.linear(pre(x), w)))
                    check = lambda: ours().float() - base().float()  # noqa: E731
                diff = check().abs().max().item()
                nbytes = w.numel() * 2 + x.numel() * 2 + M * (n // 2 if sw else n) * 2
                cell = {}
                for impl, fn in (("pass_ext", ours), ("torch", base)):
                    us = timed(fn, args.iters, flush)
                    cell[impl] = {"us": us, "tbps": nbytes / us / 1e6}
                cell["speedup"] = cell["torch"]["us"] / cell["pass_ext"]["us"]
                cell["max_abs_diff"] = diff
                row["calls"][p] = cell
            xs = {p: torch.randn(M, k, generator=g, device=dev, dtype=dtype) for p, (n, k, _) in sh.items()}

            nw = torch.ones(xs["qkv"].shape[1], device=dev, dtype=dtype)
            res = torch.randn(M, sh["o"][0], generator=g, device=dev, dtype=dtype)

            def layer_ours():  # what a small model's decode forward runs: norms and residual adds fused, weights
                pre = dict(prefetch_weights=True)  # streamed in while the kernel before finishes (sm_90)
                for L in stack:
                    ops.decode_linear(res, L["qkv"], rope_cos=cos_t, rope_sin=sin_t, positions=pos,
                                      rope_rows=(hq + hkv) * dh, norm_weight=nw, eps=1e-5, **pre)
                    x1 = ops.decode_linear(xs["o"], L["o"], residual=res, **pre)
                    ops.decode_linear(x1, L["gate_up"], swiglu=True, norm_weight=nw, eps=1e-5, **pre)
                    ops.decode_linear(xs["down"], L["down"], residual=x1, **pre)

            def layer_torch():  # the same with torch's linear and the model's compiled chains
                h = norm_chain(res, nw, 1e-5)
                for L in stack:
                    rope_base(h, L["qkv"])
                    x1, h1 = add_norm_chain(res, F.linear(xs["o"], L["o"]), nw, 1e-5)
                    swiglu_chain(F.linear(h1, L["gate_up"]))
                    _, h = add_norm_chain(x1, F.linear(xs["down"], L["down"]), nw, 1e-5)

            layer_bytes = sum(t.numel() * 2 for t in stack[0].values())
            row["layer"] = {impl: graph_us(fn, args.iters) / layers for impl, fn in
                            (("pass_ext", layer_ours), ("torch", layer_torch))}
            row["layer"]["speedup"] = row["layer"]["torch"] / row["layer"]["pass_ext"]
            row["layer"]["weight_bytes"] = layer_bytes
            row["layer"]["pass_ext_tbps"] = layer_bytes / row["layer"]["pass_ext"] / 1e6
            results.append(row)
            c = row["calls"]
            print(f"{name:>13} M={M:<2} " + " ".join(f"{p} {c[p]['pass_ext']['us']:.1f}/{c[p]['torch']['us']:.1f}"
                                                    for p in c)
                  + f" | layer {row['layer']['pass_ext']:.1f}/{row['layer']['torch']:.1f} µs"
                  f" ({time.monotonic() - t0:.0f} s)", flush=True)
        del weights, stack
        torch.cuda.empty_cache()

    os.makedirs(RESULTS, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "iters": args.iters, "norm": args.norm,
            "dtype": "bf16", "roofline_tbps": ROOFLINE_TBPS, "seconds": round(time.monotonic() - t0, 1)}
    path = os.path.join(RESULTS, f"linear{'_' + args.tag if args.tag else ''}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=1)
    print(f"\nwrote {path}")
    print(f"µs per call, pass_ext / torch (speed-up; pass_ext effective TB/s), L2 flushed; per layer: graph replay of "
          f"every layer's projections as a small model runs them / layers; {meta['device']}, torch {torch.__version__}")
    projs = list(shapes(models[0]))
    print(f"{'model':>13} {'M':>3} " + " ".join(f"{p:>24}" for p in projs) + f" {'layer':>24}")
    for r in results:
        cells = [f"{r['calls'][p]['pass_ext']['us']:.1f}/{r['calls'][p]['torch']['us']:.1f} "
                 f"({r['calls'][p]['speedup']:.2f}x;{r['calls'][p]['pass_ext']['tbps']:.2f})" for p in projs]
        lay = r["layer"]
        cells.append(f"{lay['pass_ext']:.1f}/{lay['torch']:.1f} ({lay['speedup']:.2f}x;{lay['pass_ext_tbps']:.2f})")
        print(f"{r['model']:>13} {r['M']:>3} " + " ".join(f"{c:>24}" for c in cells))
    worst = max(c["max_abs_diff"] for r in results for c in r["calls"].values())
    print(f"max |pass_ext - torch| over all calls: {worst:.3g} (bf16 outputs)")


if __name__ == "__main__":
    main()
