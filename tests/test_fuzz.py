"""Property-based tests of every op against its float64 reference over random shapes, ragged lengths, tree masks
and sampling parameters. CPU runs are few and derandomized (deterministic in CI); the CUDA variant runs
PASS_EXT_FUZZ_EXAMPLES cases per property (default 200; the dedicated run asks for 2000) and checks that it did:

    PASS_EXT_FUZZ_EXAMPLES=2000 python -m pytest -q -rP -m cuda tests/test_fuzz.py

(-rP prints, per property, how many cases ran and how often each dtype, shape class and parameter edge came up)."""
from __future__ import annotations

import math
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pass_ext import masks, ops
from sampling_reference import HAS_CUDA, warp_rows, warp_rows_matching
from test_attention import TOL, reference
from test_speculative_verify import assert_structure, greedy_reference

CPU_EXAMPLES = {"attention": 80, "sample": 120, "verify": 120}
CUDA_EXAMPLES = int(os.environ.get("PASS_EXT_FUZZ_EXAMPLES", "200"))
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")])]


def fuzz_settings(device: str, kind: str):
    n = CPU_EXAMPLES[kind] if device == "cpu" else CUDA_EXAMPLES
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


TALLY: Counter = Counter()  # what the running property's cases covered: label -> cases


def event(*labels: str) -> None:
    TALLY.update(labels)


def run_property(device: str, kind: str, body):
    """Run body(data) as a hypothesis test with the per-device budget, check that the budget was spent (hypothesis
    stops early when it believes the search space is exhausted, which would make a large run a small one) and
    print what the cases covered."""
    TALLY.clear()
    ran = [0]

    def counted(data):
        ran[0] += 1
        body(data)

    given(data=st.data())(fuzz_settings(device, kind)(counted))()
    budget = CPU_EXAMPLES[kind] if device == "cpu" else CUDA_EXAMPLES
    print(f"{kind} on {device}: {ran[0]} cases; " + ", ".join(f"{label}: {n}" for label, n in sorted(TALLY.items())))
    assert ran[0] >= budget, f"only {ran[0]} of {budget} {kind} cases ran"


# ---- attention_with_kv_cache ----------------------------------------------------------------------------------
@st.composite
def attention_case(draw, device):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.integers(1, 4))
    D = draw(st.sampled_from([8, 16, 40, 64] if device == "cpu" else [8, 16, 40, 64, 128]))
    layout = draw(st.sampled_from(["causal", "none", "fused", "random", "random_big"]))
    if layout == "fused":
        k = draw(st.integers(1, 5))
        Q = (k + 1) ** 2
        mask = masks.fused_layout(k)[0]
    elif layout == "random_big" and draw(st.integers(0, 9)) == 0:  # Q > 64 rarely: two mask words, up to the max
        Q = draw(st.integers(65, 128))
        mask = None
    else:
        Q = draw(st.integers(1, 20))
        mask = None
    if layout in ("random", "random_big"):
        seed = draw(st.integers(0, 2 ** 31 - 1))
        g = torch.Generator().manual_seed(seed)
        mask = (torch.rand(Q, Q, generator=g) < draw(st.floats(0.0, 1.0))).tril()
        if draw(st.booleans()):
            mask |= torch.eye(Q, dtype=torch.bool)
    elif layout == "causal":
        mask = torch.ones(Q, Q, dtype=torch.bool).tril()
    # Mostly short rows (one to three KV splits on a big GPU), sometimes a long one (many splits, most of them
    # empty for the short rows of the same batch).
    length = st.one_of(st.integers(0, 90), st.integers(0, 90), st.integers(0, 90), st.integers(91, 2500))
    lens = draw(st.lists(length, min_size=B, max_size=B))
    spare = draw(st.integers(0, 5))
    dtype = draw(st.sampled_from([torch.float32, torch.float64] if device == "cpu"
                                 else [torch.float32, torch.float16, torch.bfloat16]))
    return B, Q, Hq, Hkv, D, lens, spare, mask, dtype, draw(st.integers(0, 2 ** 31 - 1))


@pytest.mark.parametrize("device", DEVICES)
def test_attention_matches_reference(device):
    def body(data):
        B, Q, Hq, Hkv, D, lens, spare, mask, dtype, seed = data.draw(attention_case(device))
        event(str(dtype), "no mask" if mask is None else "tree mask", "Q > 64" if Q > 64 else "Q <= 64",
              f"head dim {D}", "a long row" if max(lens) > 90 else "short rows",
              *(["an empty row"] if 0 in lens else []))
        S = max(lens) + Q + spare
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype=dtype, device=device)  # noqa: E731
        q, k_new, v_new = rnd(B, Q, Hq, D), rnd(B, Q, Hkv, D), rnd(B, Q, Hkv, D)
        k_cache, v_cache = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
        cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        scale = 1.0 / math.sqrt(D)
        exp_out, exp_k, exp_v = reference(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale)
        out = torch.full_like(q, float("nan"))
        packed = None if mask is None else masks.pack(mask).to(device)
        ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, packed, scale, out)
        atol, rtol = TOL[(device, dtype)]
        torch.testing.assert_close(out.double(), exp_out, atol=atol, rtol=rtol)
        # New K/V land bit for bit at cache_lens[b] + j; every other slot is untouched.
        assert torch.equal(k_cache.double(), exp_k) and torch.equal(v_cache.double(), exp_v)
        assert cache_lens.tolist() == lens

    run_property(device, "attention", body)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
def test_attention_out_of_range_lengths_cuda():
    """Lengths the CPU kernel refuses (negative, or too close to the capacity for Q new tokens) cannot be refused on
    the device without a sync: the kernel attends to slots [0, clamp(len, 0, S)) plus the new tokens and writes
    only the slots len + j inside [0, S). Guard rows around the caches catch any write outside them."""
    def body(data):
        B, Q, Hq, Hkv, D, _, spare, mask, dtype, seed = data.draw(attention_case("cuda"))
        S = Q + spare + data.draw(st.integers(0, 40))
        lens = data.draw(st.lists(st.integers(-Q - 3, S + 3), min_size=B, max_size=B))
        event(str(dtype), f"{sum(not 0 <= n <= S - Q for n in lens)} of {B} rows out of range")
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g).to(dtype=dtype, device="cuda")  # noqa: E731
        q, k_new, v_new = rnd(B, Q, Hq, D), rnd(B, Q, Hkv, D), rnd(B, Q, Hkv, D)
        k_big, v_big = rnd(B + 2, Hkv, S, D), rnd(B + 2, Hkv, S, D)
        k_before, v_before = k_big.clone(), v_big.clone()
        k_cache, v_cache = k_big[1:-1], v_big[1:-1]
        out = torch.full_like(q, float("nan"))
        packed = None if mask is None else masks.pack(mask).to("cuda")
        ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache,
                                    torch.tensor(lens, dtype=torch.int32, device="cuda"), packed, None, out)
        # Output: the reference over the clamped lengths, on caches padded so that its own append fits.
        clamped = torch.tensor([min(max(n, 0), S) for n in lens], dtype=torch.int32)
        pad = lambda c: torch.cat([c.cpu(), c.new_zeros(B, Hkv, Q, D).cpu()], 2)  # noqa: E731
        exp_out, _, _ = reference(q.cpu(), k_new.cpu(), v_new.cpu(), pad(k_before[1:-1]), pad(v_before[1:-1]),
                                  clamped, mask, 1.0 / math.sqrt(D))
        atol, rtol = TOL[("cuda", dtype)]
        torch.testing.assert_close(out.cpu().double(), exp_out, atol=atol, rtol=rtol)
        # Writes: exactly the in-range slots, bit for bit; the guard rows and every other slot untouched.
        exp_k, exp_v = k_before.clone(), v_before.clone()
        for b, n in enumerate(lens):
            for j in range(Q):
                if 0 <= n + j < S:
                    exp_k[b + 1, :, n + j], exp_v[b + 1, :, n + j] = k_new[b, j], v_new[b, j]
        assert torch.equal(k_big, exp_k) and torch.equal(v_big, exp_v)

    run_property("cuda", "attention", body)


# ---- sample -----------------------------------------------------------------------------------------------------
@st.composite
def sampling_rows(draw, rows, vocab):
    """Per-row (temperature, top_k, top_p), including greedy rows and the edge values the op must take: NaN and
    negative temperatures are greedy, a subnormal one is clamped; top_k of V - 1 and V (off), negative or huge;
    top_p of 0 and 1e-6 (the maximum only), above 1 or NaN (off)."""
    temps = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.05, 3.0),
                                    st.sampled_from([-1.0, math.nan, 1e-40, 1e-3, 50.0])),
                          min_size=rows, max_size=rows))
    ks = draw(st.lists(st.one_of(st.just(0), st.integers(1, 40),
                                 st.sampled_from([-3, 10 ** 6, vocab, max(vocab - 1, 1)])),
                       min_size=rows, max_size=rows))
    ps = draw(st.lists(st.one_of(st.just(1.0), st.floats(0.05, 1.0), st.sampled_from([0.0, 1e-6, 2.0, math.nan])),
                       min_size=rows, max_size=rows))
    return temps, ks, ps


def sampling_events(temps, ks, ps, vocab) -> None:
    """Tally which warps and parameter edges the rows of one case exercise."""
    for t, k, p in zip(temps, ks, ps):
        if not t > 0:
            event("greedy row (T <= 0 or NaN)")
            continue
        event(*(["subnormal T"] if t < 1e-37 else []), "top-k on" if 0 < k < vocab else "top-k off",
              "top-p on" if p < 1 else "top-p off", *(["top-p <= 1e-6"] if p <= 1e-6 else []),
              *(["top-k = V - 1"] if k == vocab - 1 else []))


def random_logits(draw, shape, seed, dtype):
    """Gaussian logits of a random scale, sometimes integer-valued (exact ties), sometimes with -inf / NaN."""
    g = torch.Generator().manual_seed(seed)
    style = draw(st.sampled_from(["gauss", "ties", "holes"]))
    if style == "ties":
        logits = torch.randint(-3, 3, shape, generator=g).float()
    else:
        logits = torch.randn(*shape, generator=g) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    if style == "holes":
        logits[torch.rand(*shape, generator=g) < 0.2] = -math.inf
        logits[torch.rand(*shape, generator=g) < 0.05] = math.nan
    return logits.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sample_matches_reference_warp(device):
    def body(data):
        N = data.draw(st.integers(1, 6))
        V = data.draw(st.one_of(st.integers(1, 80), st.sampled_from([1000, 4099, 12289])))
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        event(str(dtype), "V > 4096 (split over chunks on CUDA)" if V > 4096 else "V <= 4096")
        logits = random_logits(data.draw, (N, V), data.draw(st.integers(0, 2 ** 31 - 1)), dtype).to(device)
        temps, ks, ps = data.draw(sampling_rows(N, V))
        sampling_events(temps, ks, ps, V)
        temperature = torch.tensor(temps, dtype=torch.float32, device=device)
        top_k = torch.tensor(ks, dtype=torch.int32, device=device)
        top_p = torch.tensor(ps, dtype=torch.float32, device=device)
        seed = torch.tensor([data.draw(st.integers(0, 2 ** 62))], device=device)
        offset = torch.tensor([data.draw(st.integers(0, 1000))], device=device)
        out = torch.full((N,), -5, dtype=torch.long, device=device)
        probs = torch.full((N, V), math.nan, device=device)
        ops.sample(logits, temperature, top_k, top_p, seed, offset, out=out, probs_out=probs)
        ref = warp_rows_matching(logits.float().cpu(), temperature.cpu(), top_k.cpu(), top_p.cpu(), probs)
        torch.testing.assert_close(probs.cpu().double(), ref, atol=1e-6, rtol=1e-4)
        out = out.cpu()
        assert ((out >= 0) & (out < V)).all()
        assert (ref[torch.arange(N), out] > 0).all(), "token outside the warped support"

    run_property(device, "sample", body)


# ---- speculative_verify ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_verify_structure_and_greedy_rows(device):
    def body(data):
        B = data.draw(st.integers(1, 6))
        k = data.draw(st.integers(0, 8))
        V = data.draw(st.one_of(st.integers(2, 60), st.sampled_from([3001, 9000])))
        dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
        seed = data.draw(st.integers(0, 2 ** 31 - 1))
        g = torch.Generator().manual_seed(seed)
        logits = random_logits(data.draw, (B, k + 1, V), seed, dtype)
        event(str(dtype), f"k={k}", *(["V > 4096 (split over chunks on CUDA)"] if V > 4096 else []))
        # Drafts: mostly the target's argmax (long accepted prefixes), some random, a few out of range.
        drafts = torch.nan_to_num(logits.float(), nan=-math.inf).argmax(-1)[:, :k].clone()
        noise = torch.rand(B, k, generator=g) < data.draw(st.sampled_from([0.0, 0.2, 0.7]))
        drafts[noise] = torch.randint(-1, V + 1, (int(noise.sum()),), generator=g)
        use_probs = data.draw(st.booleans())
        event("draft_probs" if use_probs else "one-hot drafts")
        q = torch.softmax(torch.randn(B, k, V, generator=g) * 2, -1) if use_probs else None
        temps, ks, ps = data.draw(sampling_rows(B, V))
        sampling_events(temps, ks, ps, V)
        temperature = torch.tensor(temps, dtype=torch.float32)
        top_k = torch.tensor(ks, dtype=torch.int32)
        top_p = torch.tensor(ps, dtype=torch.float32)
        out = torch.full((B, k + 1), 999, dtype=torch.long, device=device)
        accepted = torch.full((B,), -7, dtype=torch.int32, device=device)
        s = torch.tensor([data.draw(st.integers(0, 2 ** 62))], device=device)
        o = torch.tensor([data.draw(st.integers(0, 1000))], device=device)
        ops.speculative_verify(logits.to(device), drafts.to(device), None if q is None else q.to(device),
                               temperature.to(device), top_k.to(device), top_p.to(device), s, o, out, accepted)
        assert_structure(out, accepted, drafts, V)
        out, accepted = out.cpu(), accepted.cpu()
        greedy = ~(temperature > 0)
        ref_out, ref_acc = greedy_reference(logits, drafts)
        assert torch.equal(out[greedy], ref_out[greedy]) and torch.equal(accepted[greedy], ref_acc[greedy])
        # Sampling rows: the emitted (correction or bonus) token lies in the warped target's support there.
        for b in torch.nonzero(~greedy).flatten().tolist():
            a = int(accepted[b])
            p = warp_rows(logits[b, a:a + 1].float(), temperature[b:b + 1], top_k[b:b + 1], top_p[b:b + 1])[0]
            assert p[out[b, a]] > 0

    run_property(device, "verify", body)
