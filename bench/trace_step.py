"""Where a replayed decode step's time goes, block by block: per-layer timelines of the attention and decode_linear
launches from the timestamps that a trace build's kernels write (csrc/trace.h). Needs that build:

    FORCE_CUDA=1 PASS_EXT_TRACE=1 pip install --no-build-isolation --no-deps -e .
    python bench/trace_step.py --model llama-3.1-8b --context 256

The step (method `ar`) is captured as in generation, on a scratch cache holding --context tokens per row, and
replayed --reps times; each launch's first 1024 blocks record the global timer (ns, 32 ns or coarser) at entry, when
the wait for the kernel before returns, at the kernel's own points and at the end. The launches are grouped into
layers at each attention launch: "att-1" is the launch before it (the qkv projection), "att+1" the one after (o), and
so on. Printed: per position, medians over layers and replays of the first and last block's entry, the first
block's wait and the first and last block's end, relative to att-1's first wait; the handoff (the last block's end of
the launch before to the first wait here) and the body (first wait to last end); for attention its points too. The
spread of entries shows when a launch's blocks found room beside the kernel before (under a dependent launch), the
spread of ends how evenly its blocks' work came out; "blocks sharing an SM" counts the blocks that ran on an SM
with another block of the same launch (in a one-wave grid of one block per SM, stacked blocks). Kernels that are not
traced (norms outside the projections, sampling, cuBLAS) show as handoffs longer than the usual ~0.5 µs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pass_ext  # noqa: E402
from pass_ext import autotune  # noqa: E402
from pass_ext import engine as E  # noqa: E402
from pass_ext.presets import PRESETS, random_model  # noqa: E402

BLOCKS, POINTS = 1024, 16  # csrc/trace.h: marks per block, the last one the kind and SM
KIND = POINTS - 1
KINDS = {1: "attention (tensor cores)", 2: "decode_linear (bulk)", 3: "decode_linear (tiles)",
         4: "attention (CUDA cores)"}
ATTENTION = (1, 4)
# The attention kernels' own points (csrc/kernels/attention_mma.cuh, attention.cuh), in the order they pass them.
ATT_POINTS = {7: "first tile landed", 2: "keys done", 5: "merge barrier 1", 6: "merge barrier 2", 3: "rows merged",
              8: "cluster barrier 1", 9: "cluster outputs stored"}


def launches(buf: np.ndarray) -> list[dict]:
    """The slots a replay wrote, in launch order: kind, per point the first and last block's time (ns), and where
    the blocks ran: "sms", the SMs they ran on, and "shared", those of them that ran on an SM with another block of
    the same launch (the marks' last word holds the kind in its low 8 bits and the block's SM above them)."""
    out = []
    for slot in buf:
        rec = slot[slot[:, KIND] != 0]
        if not len(rec):
            continue
        sm = rec[:, KIND] >> 8
        _, per_sm = np.unique(sm, return_counts=True)
        d = {"kind": int(rec[0, KIND] & 0xFF), "blocks": len(rec), "sms": len(per_sm),
             "shared": int(per_sm[per_sm > 1].sum())}
        for p in range(KIND):
            col = rec[:, p][rec[:, p] != 0]
            if len(col):
                d[p] = (int(col.min()), int(col.max()))
        out.append(d)
    return out


def layer_rows(seq: list[dict]) -> dict:
    """Per attention launch (from the second: the first layer follows the embedding), the times of the launches
    from the one before it to the one before the next attention, relative to the first's first wait."""
    atts = [i for i, d in enumerate(seq) if d["kind"] in ATTENTION]
    rows: dict = {}
    for n, a in enumerate(atts[1:], start=1):
        end = atts[n + 1] - 1 if n + 1 < len(atts) else len(seq)
        if a < 1 or 1 not in seq[a - 1]:
            continue
        base = seq[a - 1][1][0]
        prev_end = None
        for i in range(a - 1, end):
            d = seq[i]
            if 1 not in d or 4 not in d:
                prev_end = None
                continue
            pos = "att" if i == a else f"att{i - a:+d}"
            key = (pos, KINDS.get(d["kind"], str(d["kind"])))
            r = rows.setdefault(key, {})
            r.setdefault("entry (first)", []).append(d[0][0] - base)
            r.setdefault("entry (last)", []).append(d[0][1] - base)
            r.setdefault("wait (first)", []).append(d[1][0] - base)
            r.setdefault("end (first)", []).append(d[4][0] - base)
            r.setdefault("end (last)", []).append(d[4][1] - base)
            r.setdefault("body", []).append(d[4][1] - d[1][0])
            r.setdefault("blocks (count)", []).append(d["blocks"])
            r.setdefault("blocks sharing an SM (count)", []).append(d["shared"])
            if prev_end is not None:
                r.setdefault("handoff", []).append(d[1][0] - prev_end)
            if d["kind"] in ATTENTION:
                for p, name in ATT_POINTS.items():
                    if p in d:
                        r.setdefault(f"{name} (last)", []).append(d[p][1] - base)
            prev_end = d[4][1]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", help=f"random-weight preset ({', '.join(sorted(PRESETS))})")
    ap.add_argument("--context", type=int, default=256, help="cached tokens per row")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5, help="traced replays")
    ap.add_argument("--slots", type=int, default=2048, help="launch slots in the buffer (128 KiB each)")
    ap.add_argument("--json", default=None, help="also write the medians here")
    args = ap.parse_args()
    if args.model not in PRESETS:
        sys.exit(f"--model must be one of the random-weight presets {sorted(PRESETS)}, got {args.model!r}")
    for name in ("context", "batch", "reps", "slots"):
        if getattr(args, name) < 1:
            sys.exit(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not (pass_ext.ops.has_cuda_kernels() and torch.cuda.is_available()):  # the first named on CPU too
        sys.exit("trace_step needs a GPU and a CUDA build of pass_ext")
    if not torch.ops.pass_ext.trace_buffer(None):
        sys.exit("this build of pass_ext has no trace marks: rebuild it with PASS_EXT_TRACE=1 "
                 "(FORCE_CUDA=1 PASS_EXT_TRACE=1 pip install --no-build-isolation --no-deps -e .)")
    dev = torch.device("cuda")
    model = random_model(args.model, dev, torch.bfloat16, seed=0)
    B = args.batch
    buf = torch.zeros(args.slots * BLOCKS * POINTS, dtype=torch.int64, device=dev)
    with torch.no_grad():
        # Room for the capture's warm-up step and the 21 timed replays; the traced replays start from `context` again.
        eng, state, cache = autotune.scratch_step(model, "ar", B, args.context, False, 0, steps=24)
        torch.ops.pass_ext.trace_buffer(buf)
        try:
            graph = E.StepGraph(eng, state)  # a warm-up step, then the capture: each launch takes its slot
        finally:
            torch.ops.pass_ext.trace_buffer(None)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cache.lens.fill_(args.context)
        graph.replay()
        start.record()
        for _ in range(20):
            graph.replay()
        stop.record()
        stop.synchronize()
        step_ms = start.elapsed_time(stop) / 20
        rows: dict = {}
        for _ in range(args.reps):
            cache.lens.fill_(args.context)
            buf.zero_()
            graph.replay()
            torch.cuda.synchronize()
            seq = launches(buf.view(args.slots, BLOCKS, POINTS).cpu().numpy())
            for key, r in layer_rows(seq).items():
                for name, v in r.items():
                    rows.setdefault(key, {}).setdefault(name, []).extend(v)
    n_att = sum(d["kind"] in ATTENTION for d in seq)
    print(f"{args.model} B={B}, {args.context} cached tokens: step {step_ms:.3f} ms replayed (CUDA events); "
          f"{len(seq)} traced launches, {n_att} attention; medians over layers x {args.reps} replays, µs from att-1's "
          f"first wait (p10-p90 in brackets)")
    summary = {}
    for (pos, kind), r in rows.items():
        print(f"{pos:6s} {kind}")
        for name, v in r.items():
            scale = 1 if name.endswith("(count)") else 1e3  # counts as they are, times in µs
            med = statistics.median(v) / scale
            lo, hi = np.percentile(v, [10, 90]) / scale
            summary[f"{pos} {name}"] = med
            print(f"    {name:30s} {med:8.2f}  ({lo:.2f}-{hi:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "batch": B, "context": args.context, "step_ms": step_ms,
                       "medians_us": summary}, f, indent=1)


if __name__ == "__main__":
    main()
