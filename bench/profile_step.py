"""Where a decode step's time goes: per-step wall time with and without CUDA graphs, then the CUDA kernels of
eager steps under torch.profiler, summed per kernel name (top N), next to the weight-bandwidth ideal.

    python bench/profile_step.py --model llama-3.2-1b --method ar --batch 1
    python bench/profile_step.py --model smollm2-135m --method pass --k 4 --batch 8
    python bench/profile_step.py --model llama-3.1-8b --graphs-only --rounds 3 --ab PASS_EXT_PDL=0 [--without attention]

--model takes a random-weight preset (pass_ext/presets.py) or a real model name / path (pass_ext.load_model).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pass_ext  # noqa: E402
from pass_ext.lookahead import LookaheadEmbeddings  # noqa: E402
from pass_ext.presets import PRESETS, random_model  # noqa: E402

BANDWIDTH = 4.24e12


def per_step(model, ids, args, graphs: bool, new: int):
    kw = dict(method=args.method, max_new_tokens=new, eos_token_id=False, cuda_graphs=graphs, seed=0,
              temperature=args.temperature, top_k=args.top_k)
    if args.method != "ar":
        kw["lookahead"] = args.k
    if args.method == "pass-tree":
        kw["draft_tree"] = args.tree
    return pass_ext.generate(model, ids, **kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(model, ids, args, graphs: bool) -> float:
    """Seconds per forward: a long call minus a short one (prefill and setup cancel), median of 5."""
    per = []
    for _ in range(5):
        t = []
        fw = []
        for new in (args.short, args.long):
            sync(model.device)
            t0 = time.perf_counter()
            out = per_step(model, ids, args, graphs, new)
            sync(model.device)
            t.append(time.perf_counter() - t0)
            fw.append(out.stats.forward_passes)
        per.append((t[1] - t[0]) / max(1, fw[1] - fw[0]))
    return statistics.median(per)


def replayed_step(model, args) -> float:
    """Seconds per step of the captured step replayed on a scratch cache holding --prompt tokens per row, timed
    with CUDA events (`autotune.measure_step`): the device's time alone, without the host's share of a call."""
    from pass_ext import autotune, masks
    k = 0 if args.method == "ar" else args.k
    tree = masks.default_tree(k, args.tree) if args.method == "pass-tree" else None
    return autotune.measure_step(model, args.method, args.batch, args.prompt, args.temperature > 0, k, reps=20,
                                 tree=tree)


def set_env(env: dict) -> None:
    """Set the variables of `env`; None unsets one."""
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class AttentionStub:
    """--without attention: while on, the model's attention (the op, or its PyTorch path) is a zero fill of its
    output and appends nothing to the cache. For timing random-weight steps only: what attention costs in a step
    (the step with it minus the step without). Counts the calls it replaced."""

    def __init__(self, model):
        self.model, self.calls = model, 0
        self.op = pass_ext.ops.attention_with_kv_cache

    def _zeros(self, q, *args, **kwargs):
        self.calls += 1
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)

    def set(self, on: bool) -> None:
        pass_ext.ops.attention_with_kv_cache = self._zeros if on else self.op
        if on:
            self.model._torch_attention = self._zeros
        else:
            self.model.__dict__.pop("_torch_attention", None)


def compare(model, ids, args, graphs: bool) -> None:
    """Default settings against args.ab's (and/or --without's), alternating in one process (so that the machine's
    state, which varies from process to process, is the same for both), each recaptured from scratch, in the order
    ABBA (round r starts with the default when r is even) so that neither setting always runs first. Two times per
    setting and round: whole calls (a long call minus a short one, host included: noisy on a step of ~0.5 ms) and
    the captured step replayed (`replayed_step`)."""
    alt = {}
    for item in args.ab.split(",") if args.ab else []:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("PASS_EXT_"):
            sys.exit(f"--ab takes PASS_EXT_NAME=VALUE[,...], got {item!r}")
        alt[name] = value
    base = {name: os.environ.get(name) for name in alt}
    other = ",".join(part for part in (args.ab, args.without and f"without {args.without}") if part)
    stub = AttentionStub(model) if args.without else None
    times: dict = {"default": [], other: []}
    replays: dict = {"default": [], other: []}
    for r in range(args.rounds):
        order = (("default", base), (other, alt))
        for label, env in order if r % 2 == 0 else order[::-1]:
            set_env(env)
            if stub:
                stub.set(label == other)
            pass_ext.release_workspace(model)
            per_step(model, ids, args, graphs, args.short)  # captures with these settings
            times[label].append(timed_calls(model, ids, args, graphs))
            replays[label].append(replayed_step(model, args))
            print(f"round {r}: {label:<40} {1e3 * times[label][-1]:.3f} ms/forward, "
                  f"{1e3 * replays[label][-1]:.3f} ms/step replayed", flush=True)
    set_env(base)  # the environment as it was
    if stub:
        stub.set(False)
        print(f"attention calls replaced by a zero fill: {stub.calls}")
    med = {label: statistics.median(t) for label, t in times.items()}
    rep = {label: statistics.median(t) for label, t in replays.items()}
    print(f"{args.model} {args.method} B={args.batch} k={args.k if args.method != 'ar' else 0}, medians of "
          f"{args.rounds} rounds: default {1e3 * med['default']:.3f} ms/forward, {other} "
          f"{1e3 * med[other]:.3f} ({med[other] / med['default']:.3f}x); replayed step: default "
          f"{1e3 * rep['default']:.3f} ms, {other} {1e3 * rep[other]:.3f} ({rep[other] / rep['default']:.3f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--method", default="ar", choices=["ar", "pass", "pass-paper", "pass-tree"])
    ap.add_argument("--tree", type=int, default=None, help="pass-tree: draft nodes (default: generate's)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens per row")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--short", type=int, default=8)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer version of the preset (a CPU smoke run)")
    ap.add_argument("--graphs-only", action="store_true",
                    help="time the step with graphs only (no eager timing, no kernel profile): for quick A/B runs")
    ap.add_argument("--ab", default=None, metavar="NAME=VALUE[,NAME=VALUE]",
                    help="A/B in this process: alternate the default settings with these environment settings "
                         "(only those read per forward, e.g. PASS_EXT_PREFETCH, PASS_EXT_LINEAR_MAX_ROWS), "
                         "recapturing each time, --rounds times (ABBA order); prints each round and the medians of "
                         "whole calls and of the replayed step (an unused PASS_EXT_ variable gives an A/A control)")
    ap.add_argument("--without", default=None, choices=["attention"],
                    help="A/B in this process as --ab does (alone or with --ab), the other arm without attention: "
                         "its calls become a zero fill of their output and append nothing to the cache, so only "
                         "the timing means anything (random weights): what attention costs in the step")
    ap.add_argument("--rounds", type=int, default=4, help="rounds of --ab / --without")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no GPU visible: pass --device cpu (with --tiny) for a smoke run")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.model in PRESETS:
        small = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
                     vocab_size=512) if args.tiny else {}
        model = random_model(args.model, dev, dtype, seed=0, **small)
    else:
        model = pass_ext.load_model(args.model, device=dev, dtype=dtype)
    if args.method != "ar" and model.lookahead is None:
        model.lookahead = LookaheadEmbeddings.init(model, args.k, seed=0).to(dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt), generator=g).tolist()
    graphs = dev.type == "cuda"
    if args.ab or args.without:
        compare(model, ids, args, graphs)
        return
    per_step(model, ids, args, graphs, args.short)  # warm-up (captures)
    with_graphs = timed_calls(model, ids, args, graphs)
    eager = float("nan") if args.graphs_only else timed_calls(model, ids, args, False)
    ideal = weight_bytes / BANDWIDTH
    from pass_ext.model import fusion_enabled
    from pass_ext.ops import linear_max_bytes, linear_max_rows
    linear = (f"decode_linear <= {linear_max_rows()} rows, <= {linear_max_bytes() >> 20} MiB" if linear_max_rows()
              else "decode_linear off")
    print(f"{args.model} {args.method} B={args.batch} k={args.k if args.method != 'ar' else 0} "
          f"(fused chains {'on' if fusion_enabled() else 'off'}, {linear}, T={args.temperature}): "
          f"{1e3 * with_graphs:.3f} ms/forward with graphs, {1e3 * eager:.3f} eager; weights "
          f"{weight_bytes / 1e9:.2f} GB -> ideal {1e3 * ideal:.3f} ms ({100 * ideal / with_graphs:.0f}% of it)")

    if args.graphs_only:
        return
    from torch.profiler import ProfilerActivity, profile
    per_step(model, ids, args, False, args.short)
    kind = ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[kind]) as prof:
        out = per_step(model, ids, args, False, args.long)
        sync(dev)
    steps = out.stats.forward_passes
    totals: dict = {}
    for e in prof.events():
        if dev.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA:
            t_us = e.device_time
        elif dev.type == "cpu" and e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
            t_us = e.self_cpu_time_total
        else:
            continue
        name = e.name[:90]
        t, n = totals.get(name, (0.0, 0))
        totals[name] = (t + t_us, n + 1)
    kernel_us = sum(t for t, _ in totals.values())
    what = "kernels" if dev.type == "cuda" else "aten ops (self CPU time)"
    print(f"eager call of {args.long} new tokens ({steps} forwards incl. prefill): {what} {kernel_us / 1e3:.2f} ms "
          f"in all, {kernel_us / max(1, steps):.0f} µs per forward")
    print(f"{'µs/forward':>10} {'calls/fw':>8} {'µs/call':>8}  kernel")
    for name, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{t / steps:10.1f} {n / steps:8.1f} {t / n:8.1f}  {name}")


if __name__ == "__main__":
    main()
