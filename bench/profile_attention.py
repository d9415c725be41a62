"""Run attention_with_kv_cache on a few shapes of bench_attention.py, a few calls each, for Nsight Compute:

    ncu --clock-control none -k regex:pass_ext --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats --section LaunchStats \
        python bench/profile_attention.py llama3-8b:bf16:8:4096:16 llama3-8b:bf16:1:4096:1

A shape is LAYOUT:DTYPE:B:L:Q (layouts and dtypes of bench_attention.py). Each shape runs --calls times after
one warm-up call; the launcher's choices as bench_attention.plan mirrors them are printed (the mirror cannot check
that every cluster is resident at once: where they would not be, the launcher merges through global memory instead
of the printed "cluster"; a --ab PASS_EXT_ATTENTION_CLUSTER=0 column shows which ran), the counters come from ncu.
Without ncu, --time N prints each shape's median µs over N calls (CUDA events, L2 flushed before each), and --ab
PASS_EXT_NAME=VALUE[,...] times every shape with the default settings and with those, alternating in one process
(switches the launcher reads per call):

    python bench/profile_attention.py --time 200 --ab PASS_EXT_ATTENTION_SPLIT_KEYS=256 qwen2.5-1.5b:bf16:1:4096:8
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import DTYPES, LAYOUTS, new_token_mask, plan, ragged_lengths  # noqa: E402
from bench_sampling import ab_settings, median_us  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="+", help="LAYOUT:DTYPE:B:L:Q")
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--uniform", action="store_true")
    ap.add_argument("--time", type=int, default=0, help="time N calls per shape (median µs, L2 flushed)")
    ap.add_argument("--ab", default=None, help="PASS_EXT_NAME=VALUE[,...]: also time each shape with these")
    args = ap.parse_args()
    settings = ab_settings(args.ab)
    if not torch.cuda.is_available():
        sys.exit("profile_attention.py needs a GPU")
    from pass_ext import masks, ops
    # read before each timed call (--time): L2 flushed
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda") if args.time else None
    for spec in args.shapes:
        try:
            layout, dt, B, L, Q = spec.split(":")
            Hq, Hkv, D = LAYOUTS[layout]
            dtype, B, L, Q = DTYPES[dt], int(B), int(L), int(Q)
        except (ValueError, KeyError):
            sys.exit(f"shape {spec!r} is not LAYOUT:DTYPE:B:L:Q with LAYOUT in {sorted(LAYOUTS)} and DTYPE in "
                     f"{sorted(DTYPES)}")
        lens = ragged_lengths(B, L, args.uniform)
        S = L + Q
        rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)  # noqa: E731
        q, k_new, v_new = rnd(B, Q, Hq, D), rnd(B, Q, Hkv, D), rnd(B, Q, Hkv, D)
        k_cache, v_cache = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
        cache_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        mask, _ = new_token_mask(Q)
        packed = None if Q == 1 else masks.pack(mask.cuda())
        out = torch.empty_like(q)
        choice = plan(Q, Hq, Hkv, D, B, S, dtype)
        print(f"{spec}: {choice}", flush=True)
        call = lambda: ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens,  # noqa: E731
                                                   packed, 1 / math.sqrt(D), out)
        for _ in range(args.calls + 1):
            call()
        torch.cuda.synchronize()
        if args.time:
            times = [f"{label}: {median_us(call, args.time, env, flush):.2f} µs" for label, env in settings]
            print("  " + ", ".join(times), flush=True)
        del q, k_new, v_new, k_cache, v_cache, out


if __name__ == "__main__":
    main()
