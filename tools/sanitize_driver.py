"""A few small CUDA cases that reach every path of the native ops (and the engine around them), for running under
compute-sanitizer (tools/sanitize.sh). Each case also checks its result against the CPU kernels, so a case that
ran clean but computed garbage fails too.

    python tools/sanitize_driver.py [--groups attention,sample,verify,engine,graph,linear]
                                    [--dtypes float32,bfloat16,float16]

Prints one line per group and "sanitize_driver: ok" last; exits 1 when a check fails, 2 without a GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from unittest import mock

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pass_ext  # noqa: E402
from pass_ext import masks, ops  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (atol, rtol) of the attention against float64 on the same rounded inputs (as tests/test_attention.py).
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.6e-2, 2e-2)}
GROUPS = ("attention", "sample", "verify", "engine", "graph", "linear")
# Graph capture allocates through the caching allocator; with caching off (memcheck, initcheck) torch refuses.
NO_CACHING = os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") not in (None, "", "0")


class Failures(list):
    def check(self, cond: bool, what: str) -> None:
        if not cond:
            self.append(what)
            print(f"FAIL {what}", flush=True)


def rand(g: torch.Generator, *shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# ---- attention_with_kv_cache ----------------------------------------------------------------------------------
# (name, B, Q, Hq, Hkv, D, lens, S, mask kind). The H200's 132 SMs make the launcher split the KV range when
# B * Hkv * row tiles < 264 and the capacity holds more than 64 keys; S + Q <= 64 keeps one split.
ATTENTION_CASES = [
    ("decode-gqa-one-split", 3, 1, 4, 1, 64, [0, 5, 37], 48, "causal"),
    ("fused-k4-two-splits", 2, 25, 2, 2, 128, [3, 0], 40, "fused"),
    ("split-kv-ragged-empty-row", 2, 3, 8, 2, 128, [700, 0], 720, "none"),
    # 4 rows: the last block merges the splits (with PASS_EXT_ATTENTION_CLUSTER=0 on sm_90, where by default
    # decode tiles merge in a cluster)
    ("decode-split-fused-combine", 3, 1, 8, 2, 128, [600, 0, 33], 640, "none"),
    ("decode-cluster-merge", 1, 1, 32, 8, 128, [600], 2048, "none"),  # sm_90: 16 splits in a cluster, 6 empty
    ("generic-d40-random-mask", 2, 5, 6, 2, 40, [0, 9], 20, "random"),
    ("d256-opt-in-smem", 1, 20, 2, 2, 256, [33], 60, "causal"),
    ("q128-two-mask-words", 1, 128, 4, 2, 64, [2], 136, "random"),
]


def make_mask(kind: str, Q: int, g: torch.Generator):
    if kind == "none":
        return None
    if kind == "causal":
        return torch.ones(Q, Q, dtype=torch.bool).tril()
    if kind == "fused":
        k = math.isqrt(Q) - 1
        return masks.fused_layout(k)[0]
    mask = (torch.rand(Q, Q, generator=g) < 0.4).tril()
    mask[Q // 2] = False  # a query that sees no new token (and no cache in a row of length 0)
    return mask


def attention_case(dev, dtype, g, fails, name, B, Q, Hq, Hkv, D, lens, S, kind, prefetch=False):
    q, k_new, v_new = (rand(g, B, Q, h, D, dtype=dtype) for h in (Hq, Hkv, Hkv))
    k_cache, v_cache = rand(g, B, Hkv, S, D, dtype=dtype), rand(g, B, Hkv, S, D, dtype=dtype)
    mask = make_mask(kind, Q, g)
    packed = None if mask is None else masks.pack(mask)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    # The CPU kernel in float64 is the reference for the output and the appended cache.
    ref_k, ref_v = k_cache.double(), v_cache.double()
    ref = ops.attention_with_kv_cache(q.double(), k_new.double(), v_new.double(), ref_k, ref_v, lens_t, packed, scale)
    dq, dk, dv, dkc, dvc = (t.to(dev) for t in (q, k_new, v_new, k_cache, v_cache))
    out = torch.empty_like(dq)  # not poisoned: initcheck then sees any element the kernel leaves unwritten
    ops.attention_with_kv_cache(dq, dk, dv, dkc, dvc, lens_t.to(dev), None if packed is None else packed.to(dev),
                                scale, out, prefetch_cache=prefetch)
    atol, rtol = TOL[dtype]
    err = (out.cpu().double() - ref).abs() - (atol + rtol * ref.abs())
    fails.check(bool((err <= 0).all()), f"attention {name} {dtype}: output off by up to {err.max().item():.3g}")
    fails.check(torch.equal(dkc.cpu().double(), ref_k) and torch.equal(dvc.cpu().double(), ref_v),
                f"attention {name} {dtype}: cache append differs from the CPU kernel")


def attention_out_of_range(dev, dtype, g, fails):
    """Lengths the CPU kernel refuses (negative, overflowing): the CUDA kernel clamps and must stay in bounds,
    also when it reads them before the dependent-launch wait (prefetch_cache)."""
    B, Q, Hq, Hkv, D, S = 3, 4, 4, 2, 64, 16
    q, k_new, v_new = (rand(g, B, Q, h, D, dtype=dtype).to(dev) for h in (Hq, Hkv, Hkv))
    k_cache, v_cache = (torch.zeros(B, Hkv, S, D, dtype=dtype).to(dev) for _ in range(2))  # a copy: initcheck
    lens = torch.tensor([-3, S - 2, 10 ** 6], dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, lens, None, None, out, prefetch_cache=True)
    fails.check(bool(torch.isfinite(out).all()), f"attention out-of-range lengths {dtype}: non-finite output")
    written = (k_cache != 0).any(-1).any(1).cpu()  # [B, S] slots that got a key
    expect = torch.zeros(B, S, dtype=torch.bool)
    expect[0, :1], expect[1, S - 2:] = True, True  # slots -3..0 -> only 0; S-2..S+1 -> S-2, S-1
    fails.check(torch.equal(written, expect),
                f"attention out-of-range lengths {dtype}: wrote slots {written.nonzero().tolist()}")


def run_attention(dev, dtypes, g, fails) -> int:
    n = 0
    for dtype in dtypes:
        for i, case in enumerate(ATTENTION_CASES):  # every other case reads the cache before the wait
            attention_case(dev, dtype, g, fails, *case, prefetch=i % 2 == 1)
            n += 1
        if dev.type == "cuda":  # the CPU kernel refuses such lengths instead
            attention_out_of_range(dev, dtype, g, fails)
            n += 1
    return n


# ---- sample ---------------------------------------------------------------------------------------------------
# Per-row (temperature, top_k, top_p): greedy, plain, top-k, top-p, both, and the edge values the op must
# tolerate (top_k >= V or < 0 is off, top_p <= 0 keeps the maximum, NaN / denormal / huge temperature).
SAMPLE_ROWS = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 10, 1.0), (0.9, 0, 0.9), (0.8, 10, 0.95), (1.0, 1, 1.0),
               (1.0, 10 ** 6, 1.0), (1.0, -3, 0.0), (float("nan"), 5, 0.5), (1e-40, 0, 1.0), (50.0, 3, 2.0)]


def sampling_params(rows, dev):
    t, k, p = zip(*rows)
    return (torch.tensor(t, dtype=torch.float32, device=dev), torch.tensor(k, dtype=torch.int32, device=dev),
            torch.tensor(p, dtype=torch.float32, device=dev))


def logits_with_holes(g, N, V, dtype):
    logits = rand(g, N, V, scale=3.0)
    logits[0, ::7] = -math.inf
    logits[1, ::11] = math.nan
    if N > 2:
        logits[2] = -math.inf  # no finite logit: token 0, one-hot
    return logits.to(dtype)


def sample_case(dev, dtype, g, fails, V, rows, want_probs):
    N = len(rows)
    logits = logits_with_holes(g, N, V, dtype)
    temp, top_k, top_p = sampling_params(rows, "cpu")
    seed, offset = torch.tensor([1234]), torch.tensor([7])
    ref_probs = torch.empty(N, V) if want_probs else None
    ref = ops.sample(logits, temp, top_k, top_p, seed, offset, probs_out=ref_probs)
    out = torch.empty(N, dtype=torch.long, device=dev)
    probs = torch.empty(N, V, device=dev) if want_probs else None
    ops.sample(logits.to(dev), temp.to(dev), top_k.to(dev), top_p.to(dev), seed.to(dev), offset.to(dev), out, probs)
    out = out.cpu()
    tag = f"sample V={V} {dtype}"
    fails.check(bool(((out >= 0) & (out < V)).all()), f"{tag}: token out of range {out.tolist()}")
    greedy = ~(temp > 0)
    fails.check(torch.equal(out[greedy], ref[greedy]), f"{tag}: greedy rows differ from the CPU kernel")
    if want_probs:
        probs = probs.cpu()
        fails.check(bool(((probs.sum(1) - 1).abs() < 1e-4).all()), f"{tag}: probs_out rows do not sum to 1")
        fails.check(bool((probs[torch.arange(N), out] > 0).all()), f"{tag}: a token outside its warped support")
        # CPU and CUDA warp alike up to float rounding at a top-p boundary; report, do not fail.
        off = int(((probs - ref_probs).abs() > 1e-5).any(1).sum())
        if off:
            print(f"note {tag}: {off} of {N} rows' warped distribution differ from the CPU kernel's by > 1e-5")


def run_sample(dev, dtypes, g, fails) -> int:
    n = 0
    for dtype in dtypes:
        # V = 1 and odd V < 4 (one partial group), 4099 (a second pass over the row), a real vocabulary.
        for V, rows, want in ((1, SAMPLE_ROWS[:4], True), (7, SAMPLE_ROWS, True), (4099, SAMPLE_ROWS, True),
                              (4099, SAMPLE_ROWS, False), (49152, SAMPLE_ROWS[:5], True)):
            sample_case(dev, dtype, g, fails, V, rows, want)
            n += 1
    sample_case(dev, torch.float32, g, fails, 151936, SAMPLE_ROWS[2:5], True)
    return n + 1


# ---- speculative_verify -----------------------------------------------------------------------------------------
def verify_case(dev, dtype, g, fails, B, k, V, with_probs):
    logits = rand(g, B, k + 1, V, scale=3.0).to(dtype)
    drafts = logits.float().argmax(-1)[:, :k].clone()  # mostly accepted, then a few wrong or out of range
    if k:
        drafts[0, k // 2] = (drafts[0, k // 2] + 1) % V
        drafts[-1, 0] = V if B > 2 else -1
    rows = [SAMPLE_ROWS[i % len(SAMPLE_ROWS)] for i in range(B)]
    temp, top_k, top_p = sampling_params(rows, "cpu")
    q = torch.softmax(rand(g, B, k, V, scale=2.0), -1) if with_probs else None
    seed, offset = torch.tensor([99]), torch.tensor([3])
    ref_out, ref_acc = ops.speculative_verify(logits, drafts, q, temp, top_k, top_p, seed, offset)
    out = torch.empty(B, k + 1, dtype=torch.long, device=dev)
    acc = torch.empty(B, dtype=torch.int32, device=dev)
    ops.speculative_verify(logits.to(dev), drafts.to(dev), None if q is None else q.to(dev), temp.to(dev),
                           top_k.to(dev), top_p.to(dev), seed.to(dev), offset.to(dev), out, acc)
    out, acc = out.cpu(), acc.cpu()
    tag = f"verify B={B} k={k} V={V} probs={with_probs} {dtype}"
    for b in range(B):
        a = int(acc[b])
        ok = 0 <= a <= k and torch.equal(out[b, :a], drafts[b, :a]) and 0 <= int(out[b, a]) < V
        ok = ok and bool((out[b, a + 1:] == -1).all())
        fails.check(ok, f"{tag}: row {b} breaks the structure: accepted {a}, out {out[b].tolist()}")
    greedy = ~(temp > 0)
    fails.check(torch.equal(out[greedy], ref_out[greedy]) and torch.equal(acc[greedy], ref_acc[greedy]),
                f"{tag}: greedy rows differ from the CPU kernel")


def run_verify(dev, dtypes, g, fails) -> int:
    n = 0
    for dtype in dtypes:
        for B, k, V, with_probs in ((6, 4, 1000, False), (6, 4, 1000, True), (3, 0, 57, False), (2, 8, 49152, True)):
            verify_case(dev, dtype, g, fails, B, k, V, with_probs)
            n += 1
    return n


# ---- the engine: every method on a tiny random model, ragged rows, per-row stops -------------------------------
K = 3  # drafts per step of every speculative method
Q_STEP = {"ar": 1, "pass": (K + 1) ** 2, "pass-paper": K + 1, "draft": K + 1}  # cache slots one step writes


def tiny_models(dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pass_ext.lookahead import LookaheadEmbeddings

    def make(layers, seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
        hf = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            hf.lm_head.weight.mul_(4.0 / hf.lm_head.weight.std())  # peaky: drafts get accepted
        return pass_ext.load_model(hf, dtype=dtype, device=dev)

    model = make(2, 0)
    model.lookahead = LookaheadEmbeddings.init(model, K, seed=1).to(dev)
    return model, make(1, 3)


def run_engine(dev, dtypes, g, fails) -> int:
    n = 0
    prompts = [torch.randint(2, 96, (L,), generator=g).tolist() for L in (1, 7, 3, 12)]
    for dtype in dtypes:
        model, draft = tiny_models(dev, dtype)
        ref = None
        for method in ("ar", "pass", "pass-paper", "draft"):
            kw = dict(method=method, max_new_tokens=12, eos_token_id=False, lookahead=None if method == "ar" else K,
                      draft_model=draft if method == "draft" else None,
                      # Replayed steps need capture, which torch refuses with caching off (memcheck): eager there.
                      cuda_graphs=False if NO_CACHING or dev.type != "cuda" else None)
            greedy = pass_ext.generate(model, prompts, **kw)
            ref = greedy if method == "ar" else ref
            if not torch.equal(greedy.sequences, ref.sequences):  # tests/test_engine.py asserts this; here a note
                print(f"note engine {method} {dtype}: greedy output differs from ar")
            sampled = pass_ext.generate(model, prompts, temperature=[0.0, 0.8, 1.0, 0.7], top_k=[0, 5, 0, 3],
                                        top_p=[1.0, 1.0, 0.9, 0.8], seed=5, **kw)
            fails.check(all(len(t) == 12 for t in sampled.new_tokens), f"engine {method} {dtype}: sampled lengths")
            # A tight cache: rows stop with "length" instead of writing past the capacity; EOS stops rows early.
            room = max(map(len, prompts)) - 1 + Q_STEP[method] + 5  # a few steps for the longest row
            tight = pass_ext.generate(model, prompts, max_length=room, temperature=0.9, seed=1,
                                      **{**kw, "eos_token_id": [1, 2, 3], "max_new_tokens": 30})
            fails.check(all(r in ("length", "eos", "max_new_tokens") for r in tight.stats.stop_reasons),
                        f"engine {method} {dtype}: stop reasons {tight.stats.stop_reasons}")
            n += 3
    return n


# ---- CUDA-graph capture and replay of the ops ------------------------------------------------------------------
def run_graph(dev, dtypes, g, fails) -> int:
    if dev.type != "cuda" or NO_CACHING:
        print("graph: skipped (needs CUDA and the caching allocator, which capture allocates from)")
        return 0
    n = 0
    for dtype in dtypes:
        B, Q, Hq, Hkv, D, S, V, k = 2, 5, 4, 2, 64, 300, 1000, 4  # S > 64: split KV inside the graph
        q, k_new, v_new = (rand(g, B, Q, h, D, dtype=dtype).to(dev) for h in (Hq, Hkv, Hkv))
        k_cache, v_cache = (rand(g, B, Hkv, S, D, dtype=dtype).to(dev) for _ in range(2))
        lens = torch.tensor([10, 200], dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        logits = rand(g, B, k + 1, V, dtype=dtype).to(dev)
        temp, top_k, top_p = sampling_params([(0.8, 10, 0.9), (0.0, 0, 1.0)], dev)
        temp_rep, top_k_rep, top_p_rep = (t.repeat_interleave(k) for t in (temp, top_k, top_p))
        seed, offset = torch.tensor([5], device=dev), torch.tensor([0], device=dev)
        drafts = torch.empty(B * k, dtype=torch.long, device=dev)
        probs = torch.empty(B * k, V, device=dev)
        out_tokens = torch.empty(B, k + 1, dtype=torch.long, device=dev)
        acc = torch.empty(B, dtype=torch.int32, device=dev)

        def step():
            ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, lens, None, None, out, prefetch_cache=True)
            ops.sample(logits[:, 1:].reshape(B * k, V), temp_rep, top_k_rep, top_p_rep, seed, offset, drafts, probs)
            ops.speculative_verify(logits, drafts.view(B, k), probs.view(B, k, V), temp, top_k, top_p, seed, offset,
                                   out_tokens, acc)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture (lazy module loading, workspace allocation)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for replay in range(3):
            lens.copy_(torch.tensor([10 + replay, 200 - 50 * replay]))
            offset.fill_(replay)
            graph.replay()
            eager = [t.clone() for t in (out, drafts, out_tokens, acc)]
            step()
            fails.check(all(torch.equal(a, b) for a, b in zip(eager, (out, drafts, out_tokens, acc))),
                        f"graph {dtype}: replay {replay} differs from the eager ops")
            n += 1
        del graph
    return n


# ---- decode_linear ------------------------------------------------------------------------------------------------
# (name, M, N, K, options): one tile and one split; ragged N and K (partial tile, partial chunk); four n-tiles with
# a strided x; a K split over a cluster (sm_90: few tiles, long K); SwiGLU; the rotary embedding with a v part; the
# RMSNorm with SwiGLU; the residual add with the RMSNorm. "bulk": the bulk-copy kernel (sm_90) whatever the size:
# a partial tile and a ragged last stage, K split over a cluster, x staged with the norm, x past the staging budget,
# the rotary embedding on its 1024-column ring (K a multiple of 1024), that ring forced ("ring") on a ragged K.
LINEAR_CASES = [
    ("plain-one-tile", 1, 16, 64, {}),
    ("ragged-n-k-bias", 5, 24, 40, {"bias": True}),
    ("m32-strided-x", 32, 48, 96, {"bias": True, "strided": True}),
    ("k-split-cluster", 3, 32, 8192, {}),
    ("swiglu", 9, 96, 576, {"swiglu": True, "bias": True}),
    ("rope-qkv", 5, 5 * 64, 128, {"rope": 4 * 64, "bias": True}),
    ("norm-swiglu", 2, 64, 200, {"norm": True, "swiglu": True}),
    ("norm-residual", 4, 40, 64, {"norm": True, "residual": True}),
    ("norm-long-k-prefetch", 6, 32, 4104, {"norm": True, "bias": True, "prefetch": True}),
    ("rope-prefetch", 2, 3 * 64, 64, {"rope": 2 * 64, "prefetch": True}),
    # x normalised once per block into 54 KB of shared memory: two n-tiles, strided rows, K split over a cluster
    ("norm-staged-m13-strided", 13, 32, 2056, {"norm": True, "strided": True}),
    ("bulk-ragged-bias", 5, 40, 520, {"bulk": True, "bias": True}),
    ("bulk-split-cluster-residual", 3, 32, 8192, {"bulk": True, "residual": True}),
    ("bulk-norm-swiglu-staged", 8, 64, 1544, {"bulk": True, "norm": True, "swiglu": True}),
    ("bulk-norm-m13-unstaged", 13, 48, 2056, {"bulk": True, "norm": True}),
    ("bulk-rope-norm-ring1024", 3, 5 * 64, 2048, {"bulk": True, "rope": 4 * 64, "norm": True, "bias": True}),
    ("bulk-ring1024-ragged-residual", 6, 48, 1544, {"bulk": True, "residual": True, "ring": "1024"}),
]
# The bulk kernel's size and row limits, lifted for the "bulk" cases (read by the op at every call).
BULK_ENV = {"PASS_EXT_LINEAR_BULK_MIN_MB": "0", "PASS_EXT_LINEAR_BULK_MIN_K": "0",
            "PASS_EXT_LINEAR_BULK_MAX_ROWS": "16"}


def run_linear(dev, dtypes, g, fails) -> int:
    n = 0
    for dtype in dtypes:
        if dev.type == "cuda" and dtype == torch.float32:
            continue  # the CUDA kernel takes bf16/fp16
        for name, M, N, K, o in LINEAR_CASES:
            tag = f"linear {name} {dtype}"
            wide = rand(g, M, K + 8, dtype=dtype)  # strided rows: a slice of a wider tensor, on the device too
            x, x_dev = (wide[:, :K], wide.to(dev)[:, :K]) if o.get("strided") else (wide[:, :K].contiguous(),) * 2
            kw = dict(bias=rand(g, N, dtype=dtype) if o.get("bias") else None, swiglu=bool(o.get("swiglu")),
                      prefetch_weights=bool(o.get("prefetch")))  # weights read before the dependent-launch wait
            if o.get("rope"):
                D = 64
                inv = 1.0 / 10000.0 ** (torch.arange(0, D, 2).float() / D)
                emb = torch.cat([torch.outer(torch.arange(50).float(), inv)] * 2, -1)
                kw.update(rope_cos=emb.cos(), rope_sin=emb.sin(), positions=torch.randint(0, 60, (M,), generator=g),
                          rope_rows=o["rope"])  # positions past the table are clamped
            if o.get("norm"):
                kw.update(norm_weight=(1 + 0.2 * torch.randn(K, generator=g)).to(dtype), eps=1e-5)
            if o.get("residual"):
                kw["residual"] = rand(g, M, N, dtype=dtype)
            w = rand(g, N, K, dtype=dtype, scale=K ** -0.5)
            ref = ops.decode_linear(x, w, **kw)
            env = dict(BULK_ENV) if o.get("bulk") else {}
            if o.get("ring"):
                env["PASS_EXT_LINEAR_BULK_RING"] = o["ring"]
            with mock.patch.dict(os.environ, env):
                out = ops.decode_linear(x_dev.to(dev), w.to(dev),
                                        **{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            diff = (out.cpu().float() - ref.float()).abs().max().item()
            fails.check(diff <= 0.1 * max(1.0, ref.float().abs().max().item()), f"{tag}: max |cuda - cpu| {diff:.3g}")
            n += 1
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated subset of float32,bfloat16,float16")
    ap.add_argument("--device", default="cuda", help="'cpu' checks the driver itself (CPU kernels against themselves)")
    args = ap.parse_args()
    groups = [s for s in args.groups.split(",") if s]
    dtypes = [DTYPES[s] for s in args.dtypes.split(",") if s]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        ap.error(f"unknown groups {sorted(unknown)}")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not (torch.cuda.is_available() and ops.has_cuda_kernels()):
        print("sanitize_driver: needs a CUDA GPU and the CUDA kernels (pass_ext.build_info() == 'cpu+cuda')")
        return 2
    g = torch.Generator().manual_seed(0)
    fails = Failures()
    runners = dict(attention=run_attention, sample=run_sample, verify=run_verify, engine=run_engine, graph=run_graph,
                   linear=run_linear)
    for name in groups:
        try:
            n = runners[name](dev, dtypes, g, fails)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            print(f"{name}: {n} cases", flush=True)
        except Exception:  # keep going: later groups still give the sanitizer something to check
            traceback.print_exc()
            fails.append(f"{name}: raised")
    if fails:
        print(f"sanitize_driver: {len(fails)} checks failed")
        return 1
    print("sanitize_driver: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
