"""attention_with_kv_cache against a float64 plain-PyTorch reference, on CPU and (when built and present) CUDA:
outputs, exact cache writes, tree masks, GQA, ragged lengths, argument checks and opcheck."""
from __future__ import annotations

import math

import pytest
import torch

from pass_ext import masks, ops

HAS_CUDA = torch.cuda.is_available() and ops.has_cuda_kernels()
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")])
DEVICES = ["cpu", CUDA]

# (atol, rtol) against the float64 reference computed from the same (rounded) inputs; the low-precision
# budgets cover rounding the output once plus fp32 accumulation.
TOL = {
    ("cpu", torch.float64): (1e-10, 1e-10),
    ("cpu", torch.float32): (1e-5, 1e-5),
    ("cpu", torch.bfloat16): (2e-2, 2e-2),
    ("cuda", torch.float32): (2e-5, 1e-4),
    ("cuda", torch.float16): (2e-3, 5e-3),
    ("cuda", torch.bfloat16): (1.6e-2, 2e-2),
}
DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16],
          "cuda": [torch.float32, torch.float16, torch.bfloat16]}
SENTINEL = 7.0  # cache slots that must stay untouched hold this


def reference(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale):
    """float64 attention + append. mask: bool [Q, Q] (row i sees new token j) or None = causal.
    Returns (out [B,Q,Hq,D], k_cache', v_cache') with the new tokens written at cache_lens[b] + j."""
    B, Q, Hq, D = q.shape
    Hkv = k_new.shape[2]
    G = Hq // Hkv
    if mask is None:
        mask = torch.ones(Q, Q, dtype=torch.bool).tril()
    mask = mask.to(q.device)
    q, k_new, v_new = q.double(), k_new.double(), v_new.double()
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    out = torch.zeros(B, Q, Hq, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(cache_lens[b])
        keys = torch.cat([kc[b, :, :L], k_new[b].transpose(0, 1)], 1).repeat_interleave(G, 0)  # [Hq, L+Q, D]
        vals = torch.cat([vc[b, :, :L], v_new[b].transpose(0, 1)], 1).repeat_interleave(G, 0)
        allowed = torch.cat([torch.ones(Q, L, dtype=torch.bool, device=q.device), mask], 1)  # [Q, L+Q]
        scores = torch.einsum("qhd,hkd->hqk", q[b], keys) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no visible key outputs zeros
        out[b] = torch.einsum("hqk,hkd->qhd", probs, vals)
        kc[b, :, L:L + Q] = k_new[b].transpose(0, 1)
        vc[b, :, L:L + Q] = v_new[b].transpose(0, 1)
    return out, kc, vc


def make_inputs(B, Q, Hq, Hkv, D, lens, S, dtype, device):
    """Fresh random inputs; the cache holds random data below each row's length and SENTINEL above it."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype=dtype, device=device)  # noqa: E731
    q, k_new, v_new = rnd(B, Q, Hq, D), rnd(B, Q, Hkv, D), rnd(B, Q, Hkv, D)
    k_cache, v_cache = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    for b, L in enumerate(lens):
        k_cache[b, :, L:] = SENTINEL
        v_cache[b, :, L:] = SENTINEL
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, k_new, v_new, k_cache, v_cache, cache_lens


def run_and_check(device, dtype, B, Q, Hq, Hkv, D, lens, mask=None, S=None, scale=None):
    """One call on poisoned outputs; compare out and the whole cache with the reference."""
    S = S or max(lens) + Q + 5
    q, k_new, v_new, k_cache, v_cache, cache_lens = make_inputs(B, Q, Hq, Hkv, D, lens, S, dtype, device)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    packed = None if mask is None else masks.pack(mask).to(device)
    exp_out, exp_k, exp_v = reference(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale)
    out = torch.full_like(q, float("nan"))
    ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, packed, scale, out)
    atol, rtol = TOL[(device, dtype)]
    torch.testing.assert_close(out.double(), exp_out, atol=atol, rtol=rtol)
    # The cache is a copy: the new slots hold k_new/v_new bit for bit, every other slot is unchanged.
    assert torch.equal(k_cache.double(), exp_k) and torch.equal(v_cache.double(), exp_v)
    assert torch.equal(cache_lens.cpu(), torch.tensor(lens, dtype=torch.int32)), "cache_lens must not change"
    return out


def dtypes_for(device):
    return [pytest.param(device, dt, id=f"{device}-{str(dt).split('.')[-1]}",
                         marks=() if device == "cpu" else CUDA.marks) for dt in DTYPES[device]]


DEVICE_DTYPES = dtypes_for("cpu") + dtypes_for("cuda")

# (B, Q, Hq, Hkv, D, lens): odd Q, lengths off any tile multiple (0 included), ragged rows, and the GQA
# ratios of real models (9/3, 12/2, 14/2, 32/8) plus 1 and 7.
SHAPES = [
    (1, 1, 9, 3, 64, [0]),
    (2, 1, 32, 8, 128, [1, 63]),
    (3, 3, 12, 2, 128, [0, 37, 100]),
    (2, 5, 14, 2, 64, [33, 1]),
    (2, 25, 32, 8, 128, [31, 64]),
    (2, 49, 8, 8, 64, [0, 77]),
    (1, 7, 21, 3, 64, [129]),
    (2, 128, 8, 2, 64, [65, 3]),
]


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Q{}H{}-{}D{}L{}".format(*s[:5], "_".join(map(str, s[5]))))
def test_causal_matches_reference(device, dtype, shape):
    run_and_check(device, dtype, *shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", range(1, 9))
def test_fused_mode_masks(device, k):
    """Fused-mode layouts (DESIGN §1.2): Q = (k+1)^2 up to 81, two mask words from k = 7."""
    mask, _ = masks.fused_layout(k)
    dtype = torch.float32
    run_and_check(device, dtype, 2, (k + 1) ** 2, 12, 2, 64, [3, 40 + k], mask=mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Q", [65, 100, 128])
def test_random_tree_mask_multiword(device, Q):
    """A random mask over two 64-bit words, including rows with no visible new token."""
    mask = torch.rand(Q, Q) < 0.3
    mask[5] = False
    mask[Q - 1] = False
    out = run_and_check(device, torch.float32, 2, Q, 8, 2, 128, [0, 17], mask=mask)
    # Row 0 has no cache: its fully masked queries see nothing at all and must be zeros, not NaN.
    assert torch.equal(out[0, 5], torch.zeros_like(out[0, 5]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("D", [64, 128, 96, 40])
def test_head_dims(device, D):
    """The tuned head dims and the generic path (any multiple of 8 up to 256 on CUDA)."""
    run_and_check(device, torch.float32, 2, 6, 8, 2, D, [19, 50])


@pytest.mark.parametrize("device", DEVICES)
def test_custom_scale_and_exact_fit(device):
    """A non-default scale, and a row that fills the cache to the last slot exactly."""
    run_and_check(device, torch.float32, 2, 4, 8, 4, 64, [60, 12], S=64, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
def test_large_batch_single_pass(device):
    """Enough (row, head) blocks that the CUDA launcher uses one split (no combine kernel)."""
    run_and_check(device, torch.float32, 40, 2, 16, 8, 64, list(range(3, 43)))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("Q", [1, 4, 25])
def test_long_context_split_kv_cuda(Q):
    """L = 8192 (ragged), Llama-3-8B head layout: exercises many KV splits and the combine kernel."""
    mask = None if Q != 25 else masks.fused_layout(4)[0]
    run_and_check("cuda", torch.bfloat16, 2, Q, 32, 8, 128, [8192, 8000], mask=mask, S=8192 + 200)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_out_of_range_lengths_never_write_outside_cache_cuda():
    """The device cannot raise, so it clamps: no slot outside [0, S_max) is written, nothing else is hurt."""
    B, Q, Hkv, D, S = 4, 5, 2, 64, 32
    q, k_new, v_new, k_cache, v_cache, _ = make_inputs(B, Q, 4, Hkv, D, [0] * B, S, torch.float32, "cuda")
    lens = [S - 2, -3, 10**6, 4]
    cache_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    # Guard rows on both sides of the caches: a stray write lands in them.
    k_big = torch.full((B + 2, Hkv, S, D), SENTINEL, device="cuda")
    v_big = torch.full((B + 2, Hkv, S, D), SENTINEL, device="cuda")
    k_cache, v_cache = k_big[1:-1], v_big[1:-1]
    out = torch.full_like(q, float("nan"))
    ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, None, None, out)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    for big in (k_big, v_big):
        assert (big[0] == SENTINEL).all() and (big[-1] == SENTINEL).all()
    exp_k = torch.full_like(k_cache, SENTINEL)
    exp_k[0, :, S - 2:] = k_new[0, :2].transpose(0, 1)   # 2 of 5 fit
    exp_k[1, :, 0:2] = k_new[1, 3:].transpose(0, 1)       # slots -3..1: only 0 and 1 exist
    exp_k[3, :, 4:4 + Q] = k_new[3].transpose(0, 1)       # in range: all written
    assert torch.equal(k_cache, exp_k)
    # The in-range row is still exact.
    exp_out, _, _ = reference(q[3:], k_new[3:], v_new[3:], torch.full_like(k_cache[3:], SENTINEL),
                              torch.full_like(v_cache[3:], SENTINEL), cache_lens[3:], None, 1 / math.sqrt(D))
    torch.testing.assert_close(out[3:].double(), exp_out, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(device, masked):
    B, Q, Hq, Hkv, D = 2, 5, 8, 2, 64
    q, k_new, v_new, k_cache, v_cache, cache_lens = make_inputs(B, Q, Hq, Hkv, D, [3, 9], 20, torch.float32, device)
    mask = masks.causal(Q, device=device) if masked else None
    out = torch.empty_like(q)
    # All default subtests apply: the op is deterministic and idempotent (the same slots get the same
    # values on every call), so repeated calls on the mutated caches give the same results.
    torch.library.opcheck(torch.ops.pass_ext.attention_with_kv_cache.default,
                          (q, k_new, v_new, k_cache, v_cache, cache_lens, mask, 0.125, out))


def _good_args(device, Q=3, D=64):
    q, k_new, v_new, k_cache, v_cache, cache_lens = make_inputs(2, Q, 4, 2, D, [1, 2], 16, torch.float32, device)
    return dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, cache_lens=cache_lens,
                tree_mask=None, scale=0.1, out=torch.empty_like(q))


BAD_INPUTS = {
    "q_dims": (lambda a: a.update(q=a["q"][0]), "q must"),
    "k_new_dtype": (lambda a: a.update(k_new=a["k_new"].double()), "k_new must"),
    "v_cache_shape": (lambda a: a.update(v_cache=a["v_cache"][:, :, :8]), "v_cache must"),
    "cache_lens_int64": (lambda a: a.update(cache_lens=a["cache_lens"].long()), "cache_lens must"),
    "cache_lens_size": (lambda a: a.update(cache_lens=a["cache_lens"][:1]), "cache_lens must"),
    "mask_shape": (lambda a: a.update(tree_mask=torch.zeros(3, 2, dtype=torch.long, device=a["q"].device)),
                   "tree_mask must"),
    "mask_dtype": (lambda a: a.update(tree_mask=torch.zeros(3, 1, dtype=torch.int32, device=a["q"].device)),
                   "tree_mask must"),
    "out_shape": (lambda a: a.update(out=a["out"][:, :2]), "out must"),
    "heads_not_multiple": (lambda a: a.update(q=a["q"][:, :, :3].contiguous(), out=a["out"][:, :, :3].contiguous()),
                           r"q heads \(3\) must be a multiple"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_raise(device, case):
    args = _good_args(device)
    mutate, name = BAD_INPUTS[case]
    mutate(args)
    with pytest.raises(RuntimeError, match=name):
        torch.ops.pass_ext.attention_with_kv_cache(*args.values())


def test_overflowing_length_raises_on_cpu():
    args = _good_args("cpu")
    args["cache_lens"] = torch.tensor([1, 14], dtype=torch.int32)  # 14 + Q=3 > S_max=16
    before = args["k_cache"].clone()
    with pytest.raises(RuntimeError, match=r"cache_lens\[1\]"):
        torch.ops.pass_ext.attention_with_kv_cache(*args.values())
    assert torch.equal(args["k_cache"], before), "nothing may be written when a row would overflow"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("case,name", [("Q", r"at most 128 new tokens"), ("D", r"head dim D \(q.size\(3\)\)"),
                                       ("dtype", "q dtypes")])
def test_cuda_limits_raise(case, name):
    if case == "Q":
        args = _good_args("cuda", Q=129)
        args["k_cache"] = torch.zeros(2, 2, 200, 64, device="cuda")
        args["v_cache"] = torch.zeros(2, 2, 200, 64, device="cuda")
    elif case == "D":
        args = _good_args("cuda", D=20)
    else:
        args = {key: (v.double() if key != "cache_lens" and isinstance(v, torch.Tensor) else v)
                for key, v in _good_args("cuda").items()}
    with pytest.raises(RuntimeError, match=name):
        torch.ops.pass_ext.attention_with_kv_cache(*args.values())
