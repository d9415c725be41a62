"""Run sample and speculative_verify on a few shapes of bench_sampling.py, a few calls each, for Nsight Compute:

    ncu --clock-control none -k regex:"filter|finish|probs|warp_rows|verify" --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats \
        python bench/profile_sampling.py sample:1 sample:128 verify:1:4 verify-greedy:128:4

A shape is OP:B[:k] with OP in sample, verify, verify-greedy (V = 151936, bf16 logits, by default the warp of
bench_sampling.py: T 0.8, top-k 50, top-p 0.95; --temperature, --top-k and --top-p change it). Each shape runs
--calls times after three warm-up calls, timed as bench_sampling.py times them (its time_us: L2 flushed before
each); the counters come from ncu, and the printed median is what the shape costs outside it. --ab
PASS_EXT_NAME=VALUE[,...] times every shape with the default settings and with those, alternating in one process for
--rounds rounds (switches the ops read per call), and prints the median of the rounds' medians of each and their
ratio:

    python bench/profile_sampling.py --calls 50 --rounds 3 --ab PASS_EXT_SAMPLE_SPLIT=0 sample:128 verify:128:4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_sampling import TEMPERATURE, TOP_K, TOP_P, ab_settings, median_us, time_us  # noqa: E402

OPS = ("sample", "verify", "verify-greedy")


def parse(spec: str) -> tuple[str, int, int]:
    parts = spec.split(":")
    try:
        op, batch = parts[0], int(parts[1])
        k = int(parts[2]) if len(parts) > 2 else 4
    except (IndexError, ValueError):
        op, batch, k = "", 0, 0
    if op not in OPS or batch < 1 or not 1 <= k <= 16 or len(parts) > 3:
        sys.exit(f"shape {spec!r} is not OP:B[:k] with OP in {OPS}, B >= 1 and 1 <= k <= 16")
    return op, batch, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="+", help="OP:B[:k]")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=TEMPERATURE, help=f"sampled shapes (default {TEMPERATURE})")
    ap.add_argument("--top-k", type=int, default=TOP_K, help=f"0 = off (default {TOP_K})")
    ap.add_argument("--top-p", type=float, default=TOP_P, help=f"1 = off (default {TOP_P})")
    ap.add_argument("--peaked", action="store_true",
                    help="LM-like logits: N(0, 1) with 40 tokens raised by 25 down to 13 (a small nucleus), "
                         "instead of N(0, 3)")
    ap.add_argument("--ab", default=None, help="PASS_EXT_NAME=VALUE[,...]: also time each shape with these")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of --ab")
    args = ap.parse_args()
    settings = ab_settings(args.ab)
    if not torch.cuda.is_available():
        sys.exit("profile_sampling.py needs a GPU")
    from pass_ext import ops
    dev, V = "cuda", args.vocab
    seed = torch.tensor([1234], device=dev)
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=dev)
    offset = torch.tensor([0], device=dev)

    def make(*shape):
        """bf16 logits [*shape, V]: N(0, 3), or with --peaked N(0, 1) with 40 raised tokens per row."""
        if not args.peaked:
            return (torch.randn(*shape, V, device=dev) * 3).bfloat16()
        x = torch.randn(*shape, V, device=dev)
        head = torch.rand(*shape, V, device=dev).topk(40, dim=-1).indices
        x.scatter_add_(-1, head, (25 - 0.3 * torch.arange(40, device=dev)).expand(head.shape).contiguous())
        return x.bfloat16()

    for spec in args.shapes:
        op, B, k = parse(spec)
        temperature = torch.full((B,), args.temperature, device=dev)
        top_k = torch.full((B,), args.top_k, dtype=torch.int32, device=dev)
        top_p = torch.full((B,), args.top_p, device=dev)
        if op == "sample":
            logits = make(B)
            out = torch.empty(B, dtype=torch.long, device=dev)
            call = lambda: ops.sample(logits, temperature, top_k, top_p, seed, offset, out=out)  # noqa: E731
        else:
            target = make(B, k + 1)
            out_tokens = torch.empty(B, k + 1, dtype=torch.long, device=dev)
            accepted = torch.empty(B, dtype=torch.int32, device=dev)
            if op == "verify":
                q = torch.empty(B * k, V, device=dev)
                drafts = ops.sample(target[:, :k].reshape(B * k, V), temperature.repeat_interleave(k),
                                    top_k.repeat_interleave(k), top_p.repeat_interleave(k), seed, offset,
                                    probs_out=q).reshape(B, k)
                q = q.reshape(B, k, V)
            else:
                drafts, q, temperature = target.argmax(-1)[:, :k].contiguous(), None, torch.zeros_like(temperature)
            call = lambda: ops.speculative_verify(target, drafts, q, temperature, top_k, top_p,  # noqa: E731
                                                  seed, offset, out_tokens, accepted)
        if len(settings) == 1:
            us = time_us(call, args.calls, flush)
            print(f"{spec}: {us:.1f} µs per call (median of {args.calls}, L2 flushed)", flush=True)
            continue
        rounds = {label: [] for label, _ in settings}
        for _ in range(args.rounds):
            for label, env in settings:
                rounds[label].append(median_us(call, args.calls, env, flush))
        meds = [statistics.median(rounds[label]) for label, _ in settings]
        print(f"{spec}: " + ", ".join(f"{label} {m:.1f} µs ({' '.join(f'{x:.1f}' for x in rounds[label])})"
                                      for (label, _), m in zip(settings, meds))
              + f"; ratio {meds[1] / meds[0]:.3f} (median of {args.rounds} rounds of {args.calls} calls, L2 flushed)",
              flush=True)

if __name__ == "__main__":
    main()
