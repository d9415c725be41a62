"""How fast is attention_with_kv_cache for multi-token decode, against SDPA and compiled FlexAttention?
Llama-3-8B heads (32 q / 8 kv, D=128, bf16), per layer; prints a table and writes JSON + PNG to bench/results/.

Bytes counted (the same for every implementation): K and V of the cache read, q read, out written, the new
K/V written. The baselines attend over a cache that already holds the new tokens (their append is not
timed), and SDPA backends without GQA support get K/V expanded to the q heads before timing.

    python bench/bench_attention.py [--quick] [--iters 100]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HQ, HKV, D, DTYPE = 32, 8, 128, torch.bfloat16
ROOFLINE_TBPS = 4.24  # measured H200 copy bandwidth (read + write), DESIGN §6
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed(fn, iters: int, flush: torch.Tensor) -> float:
    """Median µs of `iters` CUDA-event timed calls, L2 flushed (256 MB written) before each."""
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def new_token_mask(Q: int) -> torch.Tensor:
    """bool [Q, Q]: causal for Q = 1 and 4 (plain verification), the fused-mode layout for Q = (k+1)^2 > 4."""
    from pass_ext import masks
    k = math.isqrt(Q) - 1
    if Q > 4 and (k + 1) ** 2 == Q:
        return masks.fused_layout(k)[0]
    return torch.ones(Q, Q, dtype=torch.bool).tril()


def bench_config(B: int, L: int, Q: int, iters: int, flush: torch.Tensor, flex) -> dict:
    from pass_ext import masks, ops
    dev = "cuda"
    S = L + Q
    G = HQ // HKV
    q = torch.randn(B, Q, HQ, D, device=dev, dtype=DTYPE)
    k_new = torch.randn(B, Q, HKV, D, device=dev, dtype=DTYPE)
    v_new = torch.randn(B, Q, HKV, D, device=dev, dtype=DTYPE)
    k_cache = torch.randn(B, HKV, S, D, device=dev, dtype=DTYPE)
    v_cache = torch.randn(B, HKV, S, D, device=dev, dtype=DTYPE)
    cache_lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    new_mask = new_token_mask(Q).to(dev)
    packed = None if Q == 1 else masks.pack(new_mask)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(D)
    elem = torch.finfo(DTYPE).bits // 8
    nbytes = elem * (2 * B * HKV * L * D + 2 * B * Q * HQ * D + 2 * B * Q * HKV * D)

    results = {}

    def record(name, fn):
        try:
            us = timed(fn, iters, flush)
            results[name] = {"us": us, "tbps": nbytes / us / 1e6}
        except Exception as exc:  # one failing baseline reports n/a, the sweep goes on
            results[name] = {"us": None, "tbps": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    record("pass_ext", lambda: ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens,
                                                           packed, scale, out))

    # Baselines: [B, H, N, D] views over the cache holding the new tokens at L..L+Q-1.
    ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, packed, scale, out)
    qt = q.transpose(1, 2)
    allowed = torch.cat([torch.ones(Q, L, dtype=torch.bool, device=dev), new_mask], 1)  # [Q, L+Q]
    sdpa_mask = None if Q == 1 else allowed[None, None]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    k_exp = v_exp = None
    for name, backend in [("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)]:
        def run(backend=backend, gqa=True):
            with sdpa_kernel([backend]):
                if gqa:
                    return sdpa(qt, k_cache, v_cache, attn_mask=sdpa_mask, scale=scale, enable_gqa=True)
                return sdpa(qt, k_exp, v_exp, attn_mask=sdpa_mask, scale=scale)
        try:
            run()
            record(name, run)
        except Exception:
            if k_exp is None:
                k_exp = k_cache.repeat_interleave(G, 1)
                v_exp = v_cache.repeat_interleave(G, 1)
            record(name, lambda run=run: run(gqa=False))

    if flex is not None:
        flex_attention, create_block_mask = flex

        def mask_mod(b, h, q_idx, kv_idx):
            j = (kv_idx - L).clamp(min=0)
            return (kv_idx < L) | new_mask[q_idx, j]

        try:
            block_mask = create_block_mask(mask_mod, None, None, Q, S, device=dev)
            record("flex_compiled", lambda: flex_attention(qt, k_cache, v_cache, block_mask=block_mask, scale=scale,
                                                           enable_gqa=True))
        except Exception as exc:
            results["flex_compiled"] = {"us": None, "tbps": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}

    del q, k_new, v_new, k_cache, v_cache, out, k_exp, v_exp
    torch.cuda.empty_cache()
    return {"B": B, "L": L, "Q": Q, "bytes": nbytes, "results": results}


def plot(rows: list, impls: list, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    qs = sorted({r["Q"] for r in rows})
    fig, axes = plt.subplots(1, len(qs), figsize=(5 * len(qs), 4), sharey=True, squeeze=False)
    for ax, Q in zip(axes[0], qs):
        sub = [r for r in rows if r["Q"] == Q]
        labels = [f"B{r['B']}\nL{r['L']}" for r in sub]
        for impl in impls:
            ys = [r["results"].get(impl, {}).get("tbps") or float("nan") for r in sub]
            ax.plot(range(len(sub)), ys, marker="o", label=impl)
        ax.axhline(ROOFLINE_TBPS, color="k", ls="--", lw=1, label="copy roofline")
        ax.set_xticks(range(len(sub)), labels, fontsize=7)
        ax.set_title(f"Q = {Q}")
        ax.set_ylabel("effective TB/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("attention_with_kv_cache, 32q/8kv heads, D=128, bf16 (H200)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sweep: B {1,8}, L {512,4096}, Q {1,25}")
    ap.add_argument("--iters", type=int, default=100, help="timed runs per measurement (median reported)")
    ap.add_argument("--no-flex", action="store_true", help="skip the compiled FlexAttention baseline")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py measures CUDA kernels and needs a GPU; none is visible.")
    from pass_ext import ops
    if not ops.has_cuda_kernels():
        sys.exit("pass_ext was built without CUDA kernels; rebuild on the GPU machine (pip install -e . or "
                 "python setup.py build_ext --inplace).")

    Bs, Ls, Qs = ([1, 8], [512, 4096], [1, 25]) if args.quick else ([1, 8, 32], [512, 4096, 16384], [1, 4, 25, 49])
    flex = None
    if not args.no_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = (torch.compile(flex_attention, dynamic=False), create_block_mask)
        except Exception as exc:
            print(f"FlexAttention unavailable: {exc}")
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    rows = []
    t0 = time.time()
    for B in Bs:
        for L in Ls:
            for Q in Qs:
                row = bench_config(B, L, Q, args.iters, flush, flex)
                rows.append(row)
                ours = row["results"]["pass_ext"]
                print(f"B={B:<3} L={L:<6} Q={Q:<3} pass_ext {ours['us'] or float('nan'):8.1f} µs "
                      f"({time.time() - t0:.0f} s elapsed)", flush=True)

    impls = list(rows[0]["results"])
    os.makedirs(RESULTS, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": [HQ, HKV], "D": D,
            "dtype": str(DTYPE), "roofline_tbps": ROOFLINE_TBPS, "iters": args.iters, "quick": args.quick}
    json_path = os.path.join(RESULTS, "attention.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    png_path = os.path.join(RESULTS, "attention.png")
    wrote_png = plot(rows, impls, png_path)

    errors = {(impl, r["results"][impl].get("error")) for r in rows for impl in impls
              if r["results"].get(impl, {}).get("error")}
    for impl, err in sorted(errors):
        print(f"n/a {impl}: {err}")
    print(f"\nwrote {json_path}" + (f" and {png_path}" if wrote_png else " (no matplotlib: no PNG)"))
    print(f"µs per call (effective TB/s; roofline {ROOFLINE_TBPS} TB/s), {meta['device']}, torch {torch.__version__}")
    header = f"{'B':>3} {'L':>6} {'Q':>3} " + " ".join(f"{impl:>20}" for impl in impls)
    print(header)
    for r in rows:
        cells = []
        for impl in impls:
            res = r["results"].get(impl, {})
            cells.append(f"{res['us']:9.1f} ({res['tbps']:4.2f})" if res.get("us") else "n/a")
        print(f"{r['B']:>3} {r['L']:>6} {r['Q']:>3} " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
