"""What generate's stop checks cost in calls with EOS: a blocking check every `sync_every` steps
(PASS_EXT_GRAPH_IF=0) against the step under a CUDA graph IF node with checks one check late (the default), in one
process on one GPU, the two alternating call by call.

Per model and `sync_every`: the wall time of each call's decode loop (after the prefill, to the tokens on the host;
generate's stats: elapsed_s - prefill_s) and of the whole call, medians of --repeats; and from one more call of each,
with CUDA events around each replay: the GPU's time inside the replays and between them (idle: the host's checks
and launches; both add up to the span from the first replay to the last), and the number of replays (the IF
graph's include those queued past the end, which run only the guard). Random-weight presets, greedy; the EOS id is
one the model does not emit in the call (found by a call without EOS), so every call runs all --new tokens and both
modes do the same work.

    python bench/bench_stop_checks.py --models llama-3.1-8b,qwen2.5-1.5b,smollm2-135m-random
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pass_ext  # noqa: E402
from pass_ext import engine as E  # noqa: E402
from pass_ext.presets import PRESETS, random_model  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "stop_checks.json")
MODES = {"blocking": "0", "if-node": "1"}


class ReplayEvents:
    """CUDA events around every StepGraph replay while active (the whole process's replays)."""

    def __init__(self):
        self.marks = []
        self._orig = None

    def __enter__(self):
        self._orig, marks = E.StepGraph.replay, self.marks
        orig = self._orig

        def replay(graph):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = orig(graph)
            b.record()
            marks.append((a, b))
            return out

        E.StepGraph.replay = replay
        return self

    def __exit__(self, *exc):
        E.StepGraph.replay = self._orig

    def summary(self) -> dict:
        """After a synchronize: ms inside replays and between them, and the count."""
        m = self.marks
        inside = [a.elapsed_time(b) for a, b in m]
        gaps = [m[i][1].elapsed_time(m[i + 1][0]) for i in range(len(m) - 1)]
        return dict(replays=len(m), replay_ms_median=statistics.median(inside) if inside else None,
                    replays_ms=sum(inside), idle_ms=sum(gaps),
                    idle_largest_us=[round(1e3 * g) for g in sorted(gaps)[-3:]])


def call(model, ids, args, eos, sync_every):
    kw = dict(method=args.method, max_new_tokens=args.new, eos_token_id=eos, cuda_graphs=True, seed=0,
              sync_every=sync_every)
    if args.method != "ar":
        kw["lookahead"] = args.k
    return pass_ext.generate(model, ids, **kw)


def timed(model, ids, args, eos, sync_every):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = call(model, ids, args, eos, sync_every)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def run_model(preset: str, args, log) -> list:
    dev = torch.device("cuda")
    model = random_model(preset, dev, torch.bfloat16, seed=args.seed)
    if args.method != "ar":
        from pass_ext.lookahead import LookaheadEmbeddings
        model.lookahead = LookaheadEmbeddings.init(model, args.k, seed=args.seed).to(dev)
    g = torch.Generator().manual_seed(args.seed)
    ids = [torch.randint(0, model.config.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]
    free = call(model, ids, args, False, 4)
    emitted = {t for row in free.new_tokens for t in row.tolist()}
    eos = next(t for t in range(model.config.vocab_size - 1, -1, -1) if t not in emitted)
    rows = []
    for se in args.sync_every:
        times = {m: [] for m in MODES}
        decode = {m: [] for m in MODES}
        tokens = {}
        for m, flag in MODES.items():  # warm: capture each mode's graph
            os.environ["PASS_EXT_GRAPH_IF"] = flag
            call(model, ids, args, eos, se)
        for _ in range(args.repeats):
            for m, flag in MODES.items():
                os.environ["PASS_EXT_GRAPH_IF"] = flag
                t, out = timed(model, ids, args, eos, se)
                times[m].append(t)
                decode[m].append(out.stats.elapsed_s - out.stats.prefill_s)
                tokens[m] = [r.tolist() for r in out.new_tokens]
        row = dict(model=preset, method=args.method, batch=args.batch, new=args.new, sync_every=se,
                   same_tokens=tokens["blocking"] == tokens["if-node"],
                   all_tokens=all(len(r) == args.new for r in tokens["blocking"]))
        for m, flag in MODES.items():
            os.environ["PASS_EXT_GRAPH_IF"] = flag
            with ReplayEvents() as ev:
                _, out = timed(model, ids, args, eos, se)
            row[m] = dict(decode_ms_median=1e3 * statistics.median(decode[m]),
                          decode_ms_runs=[1e3 * t for t in decode[m]],
                          call_ms_median=1e3 * statistics.median(times[m]), call_ms_runs=[1e3 * t for t in times[m]],
                          forward_passes=out.stats.forward_passes, **ev.summary())
        b, f = row["blocking"], row["if-node"]
        row["speedup"] = b["decode_ms_median"] / f["decode_ms_median"]
        log(f"{preset} {args.method} B={args.batch} sync_every={se}: decode loop {b['decode_ms_median']:.2f} -> "
            f"{f['decode_ms_median']:.2f} ms ({row['speedup']:.3f}x; whole call {b['call_ms_median']:.1f} -> "
            f"{f['call_ms_median']:.1f}); replays' span {b['replays_ms'] + b['idle_ms']:.2f} -> "
            f"{f['replays_ms'] + f['idle_ms']:.2f} ms; GPU idle in it {b['idle_ms']:.3f} -> "
            f"{f['idle_ms']:.3f} ms; replay median {b['replay_ms_median']:.3f} -> {f['replay_ms_median']:.3f} ms "
            f"({b['replays']} -> {f['replays']} replays); same tokens {row['same_tokens']}")
        rows.append(row)
    os.environ.pop("PASS_EXT_GRAPH_IF", None)
    del model
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama-3.1-8b,qwen2.5-1.5b,smollm2-135m-random",
                    help=f"random-weight presets, comma-separated, of: {', '.join(sorted(PRESETS))}")
    ap.add_argument("--method", default="ar", choices=sorted(E.ENGINES))
    ap.add_argument("--k", type=int, default=2, help="look-ahead tokens (methods other than ar)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=160, help="prompt tokens per row")
    ap.add_argument("--new", type=int, default=72, help="new tokens per row")
    ap.add_argument("--sync-every", default="1,4", help="generate's sync_every values, comma-separated")
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per mode, alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in PRESETS]
    if unknown:
        ap.error(f"--models: unknown presets {unknown}; allowed: {', '.join(sorted(PRESETS))}")
    try:
        args.sync_every = [int(s) for s in args.sync_every.split(",") if s]
    except ValueError:
        ap.error(f"--sync-every must be positive integers, comma-separated, got {args.sync_every!r}")
    if not args.sync_every or min(args.sync_every) < 1 or min(args.new, args.repeats, args.batch, args.prompt) < 1:
        ap.error("--sync-every, --new, --repeats, --batch and --prompt must be positive")
    if not torch.cuda.is_available() or not pass_ext.ops.has_cuda_kernels():
        print("bench_stop_checks: needs a CUDA GPU and pass_ext's CUDA kernels", file=sys.stderr)
        return 1
    if not E.conditional_graphs_available():
        print("bench_stop_checks: the step cannot run under an IF node here (torch without "
              "CUDAGraph(keep_graph=True), or an earlier failure)", file=sys.stderr)
        return 1
    res = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               command="python bench/bench_stop_checks.py " + " ".join(sys.argv[1:] if argv is None else argv),
               rows=[])
    for preset in models:
        res["rows"] += run_model(preset, args, lambda s: print(s, flush=True))
    res["guard_failures"] = list(E._GUARD_FAILED)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
