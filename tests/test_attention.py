"""attention_with_kv_cache against a float64 plain-PyTorch reference, on CPU and (when built and present) CUDA:
outputs, exact cache writes, tree masks, GQA, ragged lengths, argument checks and opcheck."""
from __future__ import annotations

import math
import os
import subprocess
import sys

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


def run_and_check(device, dtype, B, Q, Hq, Hkv, D, lens, mask=None, S=None, scale=None, prefetch_cache=False):
    """One call on poisoned outputs; compare out and the whole cache with the reference."""
    S = S or max(lens) + Q + 5
    q, k_new, v_new, k_cache, v_cache, cache_lens = make_inputs(B, Q, Hq, Hkv, D, lens, S, dtype, device)
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    packed = None if mask is None else masks.pack(mask).to(device)
    exp_out, exp_k, exp_v = reference(q, k_new, v_new, k_cache, v_cache, cache_lens, mask, scale)
    out = torch.full_like(q, float("nan"))
    ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, packed, scale, out,
                                prefetch_cache=prefetch_cache)
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


# Layouts of q / k_new / v_new besides contiguous: the q, k and v slices of a fused qkv projection, as the model
# passes them (the CUDA kernels read them in place); the same with a token stride that is not a multiple of
# 16 bytes, and heads and tokens swapped in memory (the op copies those first).
STRIDED_LAYOUTS = ["qkv_slices", "odd_token_stride", "transposed"]


@pytest.mark.parametrize("device,dtype", dtypes_for("cpu")[:1] + dtypes_for("cuda"))
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
@pytest.mark.parametrize("B,Q,Hq,Hkv,D,lens", [(3, 1, 32, 8, 128, [5, 0, 70]), (2, 4, 9, 3, 64, [17, 64]),
                                               (1, 25, 12, 2, 128, [130]), (2, 16, 14, 2, 64, [1, 40])])
def test_strided_new_tokens(device, dtype, layout, B, Q, Hq, Hkv, D, lens):
    """q / k_new / v_new as views give the same result and cache as contiguous copies of them."""
    S = max(lens) + Q + 3
    _, _, _, k_cache, v_cache, cache_lens = make_inputs(B, Q, Hq, Hkv, D, lens, S, dtype, device)
    width = (Hq + 2 * Hkv) * D
    qkv = torch.randn(B, Q, width + (layout == "odd_token_stride")).to(dtype=dtype, device=device)[..., :width]
    q = qkv[..., :Hq * D].unflatten(-1, (Hq, D))
    k_new = qkv[..., Hq * D:(Hq + Hkv) * D].unflatten(-1, (Hkv, D))
    v_new = qkv[..., (Hq + Hkv) * D:].unflatten(-1, (Hkv, D))
    if layout == "transposed":
        q, k_new, v_new = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k_new, v_new))
    assert not v_new.is_contiguous() or (layout == "transposed" and Q == 1)  # one token: nothing to swap
    assert not q.is_contiguous() or B * Q == 1 or (layout == "transposed" and Q == 1)
    before_k, before_v = k_new.clone(), v_new.clone()
    exp_out, exp_k, exp_v = reference(q.contiguous(), k_new.contiguous(), v_new.contiguous(), k_cache, v_cache,
                                      cache_lens, None, 1.0 / math.sqrt(D))
    out = ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens)
    atol, rtol = TOL[(device, dtype)]
    torch.testing.assert_close(out.double(), exp_out, atol=atol, rtol=rtol)
    assert torch.equal(k_cache.double(), exp_k) and torch.equal(v_cache.double(), exp_v)
    assert torch.equal(k_new, before_k) and torch.equal(v_new, before_v)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("B,Q,Hq,Hkv,D,lens,S", [(1, 1, 9, 3, 64, [300], 400), (2, 1, 12, 2, 128, [5, 4000], 4100),
                                                 (2, 5, 14, 2, 64, [0, 31], 64), (1, 25, 32, 8, 128, [700], 800)])
def test_prefetch_cache_gives_the_same_bits(B, Q, Hq, Hkv, D, lens, S):
    """With prefetch_cache the kernels read cache_lens and the first tiles of cached keys before waiting for the
    kernel before them (sm_90): the same output and cache, bit for bit, on the CUDA-core and tensor-core kernels,
    with one split, splits merged in a cluster, and tiles that start inside the new tokens (L = 0, 31)."""
    mask = masks.fused_layout(4)[0] if Q == 25 else None
    outs = []
    for pre in (False, True):
        torch.manual_seed(B * Q + D)  # the same inputs for both calls
        outs.append(run_and_check("cuda", torch.bfloat16, B, Q, Hq, Hkv, D, lens, mask=mask, S=S,
                                  prefetch_cache=pre))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("keys", ["32", "96"])
@pytest.mark.parametrize("Q,Hq,Hkv,D,lens,S", [
    (1, 9, 3, 64, [300, 7, 0], 384),    # SmolLM2's decode heads, CUDA-core kernel: 12 splits of 32 keys
    (5, 32, 8, 128, [1000, 45, 2], 1100),  # tensor-core kernel: its splits stay at 64 keys or more
])
def test_split_keys_setting(monkeypatch, keys, Q, Hq, Hkv, D, lens, S):
    """PASS_EXT_ATTENTION_SPLIT_KEYS (read per call) may ask for splits of 32 keys, any multiple of the key tile;
    results stay within the reference's tolerance, whichever kernel and merge run."""
    monkeypatch.setenv("PASS_EXT_ATTENTION_SPLIT_KEYS", keys)
    run_and_check("cuda", torch.bfloat16, len(lens), Q, Hq, Hkv, D, lens, S=S)
    for bad in ("16", "48", "x"):
        monkeypatch.setenv("PASS_EXT_ATTENTION_SPLIT_KEYS", bad)
        with pytest.raises(RuntimeError, match="PASS_EXT_ATTENTION_SPLIT_KEYS must be (a positive multiple of 32|an integer from 1)"):
            run_and_check("cuda", torch.bfloat16, 1, 1, 4, 2, 64, [3], S=64)


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
@pytest.mark.parametrize("dtype,Hq", [(torch.float32, 4), (torch.bfloat16, 8), (torch.float16, 16)],
                         ids=["fp32-cuda-cores", "bf16-tensor-cores", "fp16-tensor-cores"])
def test_out_of_range_lengths_never_write_outside_cache_cuda(dtype, Hq):
    """The device cannot raise, so it clamps: no slot outside [0, S_max) is written, nothing else is hurt.
    Hq = 8 and 16 give 20 and 40 query rows per KV head: the tensor-core kernel."""
    B, Q, Hkv, D, S = 4, 5, 2, 64, 32
    q, k_new, v_new, k_cache, v_cache, _ = make_inputs(B, Q, Hq, Hkv, D, [0] * B, S, dtype, "cuda")
    lens = [S - 2, -3, 10**6, 4]
    cache_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    # Guard rows on both sides of the caches: a stray write lands in them.
    k_big = torch.full((B + 2, Hkv, S, D), SENTINEL, dtype=dtype, device="cuda")
    v_big = torch.full((B + 2, Hkv, S, D), SENTINEL, dtype=dtype, device="cuda")
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
    atol, rtol = TOL[("cuda", dtype)]
    torch.testing.assert_close(out[3:].double(), exp_out, atol=atol, rtol=rtol)


# ---- the tensor-core kernel (CUDA, fp16/bf16, D 64/128, Q * Hq / Hkv >= 4 packed query rows per KV head) ----
# (B, Q, Hq, Hkv, D, lens, S, mask): every block layout (4..16 rows, one m16 tile padded: 4 warps split the
# keys; 17..32: 2 x 2; more: 64-row tiles, the last partly padding, up to 16 tiles), G = 1..16, ragged rows with empty caches, caches
# far larger than the rows (splits that get no keys), causal, fused-mode and random multi-word tree masks.
# Small B * Hkv makes the launcher split the keys (combine kernel); B = 40 runs one split.
MMA_CASES = {
    "R4-G4-Q1": (3, 1, 32, 8, 128, [0, 65, 200], None, "causal"),
    "R8-G2-Q4": (2, 4, 8, 4, 64, [37, 3], None, "causal"),
    "R12-G3-Q4": (2, 4, 9, 3, 64, [1, 90], None, "causal"),
    "R16-G1": (1, 16, 8, 8, 64, [37], None, "causal"),
    "R16-G4-ragged": (2, 4, 32, 8, 128, [100, 5], None, "causal"),
    "R16-G16-Q1": (3, 1, 16, 1, 128, [0, 65, 200], None, "causal"),
    "R27-G3-fused2": (2, 9, 9, 3, 64, [64, 1], None, "fused"),
    "R48-G16": (2, 3, 32, 2, 64, [190, 7], None, "causal"),
    "R48-G6-tree": (1, 8, 12, 2, 128, [300], None, "tree"),       # pass-tree's default step on Qwen2.5-1.5B
    "R64-G4-Q16": (3, 16, 32, 8, 128, [5, 700, 64], None, "causal"),
    "R100-G4-fused4": (2, 25, 32, 8, 128, [31, 300], None, "fused"),
    "R150-G6-fused4": (1, 25, 12, 2, 128, [513], None, "fused"),
    "R175-G7-fused4": (2, 25, 14, 2, 64, [0, 129], None, "fused"),
    "R196-G4-fused6": (1, 49, 32, 8, 128, [129], None, "fused"),
    "R512-G4-random2w": (1, 128, 32, 8, 128, [70], None, "random"),
    "R1024-G16": (2, 64, 16, 1, 64, [1000, 3], None, "causal"),
    "empty-splits": (2, 16, 4, 4, 128, [3, 2000], 2100, "causal"),
    "one-split-B40": (40, 4, 32, 8, 64, list(range(40, 120, 2)), None, "causal"),
}


def _mma_mask(kind, Q):
    if kind == "tree":  # pass-tree's default step: the pending token, 3 candidates, one look-ahead token each
        return masks.tree_layout(masks.default_tree(1), 1).mask
    if kind == "fused":
        return masks.fused_layout(math.isqrt(Q) - 1)[0]
    if kind == "random":  # two mask words, rows that see no new token at all
        mask = torch.rand(Q, Q) < 0.3
        mask[5] = False
        mask[Q - 1] = False
        return mask
    return None


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", sorted(MMA_CASES))
def test_tensor_core_path_cuda(case, dtype):
    B, Q, Hq, Hkv, D, lens, S, kind = MMA_CASES[case]
    run_and_check("cuda", dtype, B, Q, Hq, Hkv, D, lens, mask=_mma_mask(kind, Q), S=S)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("Q,Hq,Hkv", [(4, 32, 8), (25, 32, 8), (25, 9, 3), (64, 8, 2)])
def test_tensor_core_long_context_cuda(dtype, Q, Hq, Hkv):
    """L = 8192 and 4000 (ragged, S_max 16384): many splits per row, some empty, on the tensor-core kernel."""
    mask = masks.fused_layout(4)[0] if Q == 25 else None
    run_and_check("cuda", dtype, 2, Q, Hq, Hkv, 128, [8192, 4000], mask=mask, S=16384)


def _cuda_kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "attention" in e.name]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("dtype,Q,D,default", [
    (torch.bfloat16, 4, 128, True),    # 4 tokens x group 4 = 16 rows
    (torch.float16, 25, 64, True),
    (torch.bfloat16, 1, 128, True),    # 1 token x group 4 = 4 rows: the default minimum
    (torch.float32, 25, 128, False),   # fp32 stays on CUDA cores
    (torch.bfloat16, 25, 96, False),   # head dims other than 64/128 too
])
def test_kernel_choice_cuda(dtype, Q, D, default):
    """The launcher sends exactly the calls ops.attention_uses_tensor_cores names to the tensor-core kernel
    (`default`: the choice without PASS_EXT_ATTENTION_TC* in the environment)."""
    expect_mma = ops.attention_uses_tensor_cores(dtype, Q, 32, 8, D)
    if not any(name.startswith("PASS_EXT_ATTENTION_TC") for name in os.environ):
        assert expect_mma == default
    args = make_inputs(2, Q, 32, 8, D, [50, 7], 100, dtype, "cuda")
    out = torch.empty_like(args[0])
    names = _cuda_kernel_names(lambda: ops.attention_with_kv_cache(*args, None, None, out))
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels here")
    assert any("attention_mma_kernel" in n for n in names) == expect_mma, names
    assert any("attention_kernel" in n and "mma" not in n for n in names) != expect_mma, names


def run_script_with_env(script: str, **env) -> None:
    """Run `script` in a fresh interpreter (the launcher reads its switches once per process) with the tests'
    folder and the repository first on sys.path and `env` added; it must print 'ok' last."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = "import sys; sys.path[:0] = sys.argv[1:3]; " + script
    proc = subprocess.run([sys.executable, "-c", script, tests_dir, os.path.dirname(tests_dir)],
                          capture_output=True, text=True, env=dict(os.environ, **env), timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_run_script_with_env():
    run_script_with_env("import os; import test_attention; assert os.environ['PASS_EXT_PROBE'] == '1'; "
                        "print('ok')", PASS_EXT_PROBE="1")
    with pytest.raises(AssertionError):
        run_script_with_env("print('not it')")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_tensor_core_switch_off_cuda():
    """PASS_EXT_ATTENTION_TC=0 (read once per process) routes qualifying calls to the CUDA-core kernel, which
    still matches the reference."""
    script = (
        "import torch; import test_attention as t; "
        "from pass_ext import masks; "
        "t.run_and_check('cuda', torch.bfloat16, 2, 25, 32, 8, 128, [31, 300], mask=masks.fused_layout(4)[0]); "
        "args = t.make_inputs(2, 4, 32, 8, 128, [50, 7], 100, torch.bfloat16, 'cuda'); "
        "names = t._cuda_kernel_names(lambda: t.ops.attention_with_kv_cache(*args)); "
        "assert not any('attention_mma_kernel' in n for n in names), names; print('ok')"
    )
    run_script_with_env(script, PASS_EXT_ATTENTION_TC="0")


# Split-KV calls: (dtype, B, Q, Hq, Hkv, D, lens, fused). Merged through global memory (no sm_90, or
# PASS_EXT_ATTENTION_CLUSTER=0), `fused`: the last block of a tile's splits merges them (at most 8 query rows per
# tile), else the combine kernel runs. Ragged rows leave most splits of a short row empty: those blocks count
# themselves done too, and may be the last.
SPLIT_COMBINE_CASES = {
    "tc_decode": (torch.bfloat16, 1, 1, 32, 8, 128, [4000], True),
    "tc_ragged": (torch.float16, 3, 2, 9, 3, 64, [3000, 10, 0], True),
    "cc_fp32_ragged": (torch.float32, 3, 1, 32, 8, 128, [2500, 0, 33], True),
    "cc_odd_head_dim": (torch.bfloat16, 2, 1, 9, 3, 96, [1500, 7], True),
    "tc_many_rows": (torch.bfloat16, 1, 64, 8, 2, 64, [4000], False),
    "tc_pass_k1_rows": (torch.bfloat16, 2, 4, 9, 3, 64, [900, 3], False),  # 12 rows
    # The merge's lane layouts: 16 / 4 splits per warp at once (D = 8, 32), idle lanes (D = 24), two channel
    # passes (D = 256), each with more splits than a warp has lanes where the length allows.
    "cc_d8_many_splits": (torch.float32, 1, 1, 4, 1, 8, [4000], True),
    "cc_d32_combine_kernel": (torch.float32, 1, 4, 8, 2, 32, [3000], False),  # 16 rows
    "cc_d24_idle_lanes": (torch.bfloat16, 2, 1, 8, 2, 24, [3000, 100], True),
    "cc_d256_two_passes": (torch.float16, 1, 1, 8, 4, 256, [3000], True),
    # Cluster sizes 2 and 3 (H200: 264 block slots over 96 and 72 tiles), 16 with two key warps (20 rows), and
    # the CUDA-core kernel's 16-row tile; ragged, so some splits of a cluster are empty. Each launch's clusters
    # all fit on the H200 at once (the launcher's condition).
    "cl_tc_two": (torch.bfloat16, 12, 1, 32, 8, 128, [700, 0, 1, 63, 64, 65, 300, 699, 2, 640, 5, 129], True),
    "cl_tc_three": (torch.bfloat16, 9, 1, 32, 8, 128, [900, 5, 0, 450, 128, 899, 17, 600, 2], True),
    "cl_tc_key_warps": (torch.float16, 1, 5, 32, 8, 128, [3000], False),
    "cl_cc_rows16": (torch.float32, 1, 3, 32, 8, 128, [2000], False),
}
# On an H200 (132 SMs), the cases that merge in a cluster by default: tiles of at most 16 rows. With
# PASS_EXT_ATTENTION_CLUSTER=all every case does but these, whose split count exceeds the cluster bound where
# capping it would leave most SMs idle (one or two KV heads).
CLUSTER_DEFAULT = {"tc_decode", "tc_ragged", "cc_fp32_ragged", "cc_odd_head_dim", "cl_tc_two", "cl_tc_three",
                   "tc_pass_k1_rows", "cl_cc_rows16"}
CLUSTER_FALLBACK = {"cc_d8_many_splits", "cc_d32_combine_kernel", "cc_d24_idle_lanes", "cc_d256_two_passes"}


def cluster_expected(case: str) -> bool:
    """Whether the launcher merges `case`'s splits in a cluster here (an sm_90 GPU; PASS_EXT_ATTENTION_CLUSTER)."""
    mode = os.environ.get("PASS_EXT_ATTENTION_CLUSTER", "1")
    if not (HAS_CUDA and torch.cuda.get_device_capability()[0] >= 9) or mode == "0":
        return False
    return case not in CLUSTER_FALLBACK if mode == "all" else case in CLUSTER_DEFAULT


def check_split_case(case: str) -> None:
    """Run `case` three times against the reference, then check which merge ran: a cluster leaves no combine
    kernel; through global memory the combine kernel runs unless the fused combine does."""
    dtype, B, Q, Hq, Hkv, D, lens, fused = SPLIT_COMBINE_CASES[case]
    for _ in range(3):  # the counters (where used) must be back at zero after every launch
        run_and_check("cuda", dtype, B, Q, Hq, Hkv, D, lens, S=max(lens) + Q + 40)
    args = make_inputs(B, Q, Hq, Hkv, D, lens, max(lens) + Q + 40, dtype, "cuda")
    names = _cuda_kernel_names(lambda: ops.attention_with_kv_cache(*args))
    if not names or os.environ.get("PASS_EXT_ATTENTION_FUSED_COMBINE") == "0":
        return
    combine_kernel = any("attention_combine_kernel" in n for n in names)
    if cluster_expected(case):
        assert not combine_kernel, names
    else:
        assert combine_kernel != fused, names


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("case", sorted(SPLIT_COMBINE_CASES))
def test_split_combine_cuda(case):
    check_split_case(case)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("mode", ["0", "all"])
def test_split_combine_cluster_modes_cuda(mode):
    """PASS_EXT_ATTENTION_CLUSTER (set for the whole process here): with 0 every split case merges through global memory
    (fused combine or combine kernel), with `all` every case a cluster fits merges in one (cluster sizes 2 to
    16, tiles of 4 to 64 rows, both kernels); each matches the reference."""
    script = ("import test_attention as t; "
              "[t.check_split_case(c) for c in sorted(t.SPLIT_COMBINE_CASES)]; print('ok')")
    run_script_with_env(script, PASS_EXT_ATTENTION_CLUSTER=mode)


def check_same_bits(inputs, exp_out, monkeypatch, name, values, no_combine_kernel=False) -> None:
    """attention_with_kv_cache on fresh copies of `inputs` once per value of the switch `name` (read per call): the
    first output matches the reference `exp_out`, and every value gives the same bits. With no_combine_kernel, no
    call may launch the combine kernel (its splits merged in a cluster)."""
    outs = []
    for value in values:
        monkeypatch.setenv(name, value)
        q, k_new, v_new, k_cache, v_cache, cache_lens = (t.clone() for t in inputs)
        out = torch.full_like(q, float("nan"))
        names = _cuda_kernel_names(
            lambda: ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, None, None, out))
        if no_combine_kernel and names:
            assert not any("attention_combine_kernel" in n for n in names), names
        outs.append(out)
    atol, rtol = TOL[("cuda", q.dtype)]
    torch.testing.assert_close(outs[0].double(), exp_out, atol=atol, rtol=rtol)
    for other in outs[1:]:
        assert torch.equal(outs[0], other)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("case", ["tc_decode", "tc_ragged", "cl_tc_two", "tc_no_split"])
def test_warp_merge_same_bits_cuda(case, monkeypatch):
    """The tensor-core kernel's 16-row tiles merge their key warps' states with every thread by default, and with
    key warp 0 alone under PASS_EXT_ATTENTION_WARP_MERGE=0 (read per call): the same additions in the same order,
    so the same bits, whether the splits then merge in a cluster, through global memory or there is one split."""
    if case == "tc_no_split":
        dtype, B, Q, Hq, Hkv, D, lens = torch.bfloat16, 2, 1, 32, 8, 128, [40, 3]
    else:
        dtype, B, Q, Hq, Hkv, D, lens, _ = SPLIT_COMBINE_CASES[case]
    S = max(lens) + Q + 40
    inputs = make_inputs(B, Q, Hq, Hkv, D, lens, S, dtype, "cuda")
    exp_out, _, _ = reference(*inputs, None, 1.0 / math.sqrt(D))
    check_same_bits(inputs, exp_out, monkeypatch, "PASS_EXT_ATTENTION_WARP_MERGE", ("1", "0"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("case", sorted(CLUSTER_DEFAULT | {"cl_tc_key_warps", "cl_cc_rows16", "tc_pass_k1_rows"}))
def test_cluster_merge_cuda(case, monkeypatch):
    """The splits of a row tile merge in a thread-block cluster (no combine kernel) and match the reference over
    cluster sizes 2 to 16, one to three rounds of items per lane group, both kernels, ragged rows with empty splits
    and head dims 64, 96 and 128. The last three cases merge in a cluster only with PASS_EXT_ATTENTION_CLUSTER=all,
    set here for them; a value it does not allow names the variable and its values."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90")
    name = "PASS_EXT_ATTENTION_CLUSTER"
    dtype, B, Q, Hq, Hkv, D, lens, _ = SPLIT_COMBINE_CASES[case]
    S = max(lens) + Q + 40
    inputs = make_inputs(B, Q, Hq, Hkv, D, lens, S, dtype, "cuda")
    exp_out, _, _ = reference(*inputs, None, 1.0 / math.sqrt(D))
    check_same_bits(inputs, exp_out, monkeypatch, name, ("1" if case in CLUSTER_DEFAULT else "all",),
                    no_combine_kernel=True)
    monkeypatch.setenv(name, "some")
    with pytest.raises(RuntimeError, match="PASS_EXT_ATTENTION_CLUSTER must be 1, 0 or all, got 'some'"):
        ops.attention_with_kv_cache(*(t.clone() for t in inputs), None, None, torch.empty_like(inputs[0]))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_cluster_rows_bound_cuda(monkeypatch):
    """PASS_EXT_ATTENTION_CLUSTER_ROWS (read per call, default 16) bounds the tiles that merge in a cluster: the
    12-row tile of a fused PaSS step at k = 1 does at 12 and runs the combine kernel at 8, with the same bits;
    a value out of range names the variable and its range."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90")
    dtype, B, Q, Hq, Hkv, D, lens, _ = SPLIT_COMBINE_CASES["tc_pass_k1_rows"]
    inputs = make_inputs(B, Q, Hq, Hkv, D, lens, max(lens) + Q + 40, dtype, "cuda")
    exp_out, _, _ = reference(*inputs, None, 1.0 / math.sqrt(D))
    check_same_bits(inputs, exp_out, monkeypatch, "PASS_EXT_ATTENTION_CLUSTER_ROWS", ("12",), no_combine_kernel=True)
    monkeypatch.setenv("PASS_EXT_ATTENTION_CLUSTER_ROWS", "8")
    names = _cuda_kernel_names(lambda: ops.attention_with_kv_cache(*(t.clone() for t in inputs)))
    assert any("attention_combine_kernel" in n for n in names), names
    monkeypatch.setenv("PASS_EXT_ATTENTION_CLUSTER_ROWS", "0")
    with pytest.raises(RuntimeError, match="PASS_EXT_ATTENTION_CLUSTER_ROWS must be an integer from 1 to 2048"):
        ops.attention_with_kv_cache(*(t.clone() for t in inputs), None, None, torch.empty_like(inputs[0]))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_warp_merge_serial_switch_cuda():
    """PASS_EXT_ATTENTION_WARP_MERGE=0 with clusters off: every split case through key warp 0's serial merge and
    global memory matches the reference."""
    script = ("import test_attention as t; "
              "[t.check_split_case(c) for c in sorted(t.SPLIT_COMBINE_CASES)]; print('ok')")
    run_script_with_env(script, PASS_EXT_ATTENTION_WARP_MERGE="0", PASS_EXT_ATTENTION_CLUSTER="0")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("dtype,Hq,Hkv,D", [(torch.bfloat16, 32, 8, 128), (torch.float32, 9, 3, 64)])
def test_split_combine_in_cuda_graph(dtype, Hq, Hkv, D):
    """A captured call with split keys, replayed with new lengths each time (other splits empty each time): every
    replay matches the reference. On the H200 the fp32 case merges in a cluster and the bf16 one (16 clusters of 16
    would not all be resident) by the fused combine, whose counters each launch must leave zeroed."""
    B, Q, S = 2, 1, 3000
    q, k_new, v_new, k_cache, v_cache, cache_lens = make_inputs(B, Q, Hq, Hkv, D, [2900, 5], S, dtype, "cuda")
    k0, v0 = k_cache.clone(), v_cache.clone()
    out = torch.empty_like(q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, None, None, out)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            ops.attention_with_kv_cache(q, k_new, v_new, k_cache, v_cache, cache_lens, None, None, out)
    torch.cuda.current_stream().wait_stream(stream)
    atol, rtol = TOL[("cuda", dtype)]
    for lens in ([2900, 5], [0, 2990], [1, 1], [2999, 2000], [2900, 5]):
        k_cache.copy_(k0)
        v_cache.copy_(v0)
        cache_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        exp_out, _, _ = reference(q, k_new, v_new, k_cache, v_cache, cache_lens, None, 1.0 / math.sqrt(D))
        out.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(out.double(), exp_out, atol=atol, rtol=rtol, msg=lambda m: f"lens {lens}: {m}")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_split_combine_kernel_switch_cuda():
    """PASS_EXT_ATTENTION_FUSED_COMBINE=0 (read once per process) keeps the combine kernel, same results (clusters
    off: the case would merge in one)."""
    script = (
        "import torch; import test_attention as t; "
        "c = t.SPLIT_COMBINE_CASES['tc_ragged']; t.run_and_check('cuda', *c[:7], S=max(c[6]) + 50); "
        "args = t.make_inputs(*c[1:7], max(c[6]) + 50, c[0], 'cuda'); "
        "names = t._cuda_kernel_names(lambda: t.ops.attention_with_kv_cache(*args)); "
        "assert not names or any('attention_combine_kernel' in n for n in names), names; print('ok')"
    )
    run_script_with_env(script, PASS_EXT_ATTENTION_FUSED_COMBINE="0", PASS_EXT_ATTENTION_CLUSTER="0")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_opcheck_tensor_cores_cuda(dtype):
    B, Q, Hq, Hkv, D = 2, 5, 16, 2, 64  # 40 rows per KV head
    q, k_new, v_new, k_cache, v_cache, cache_lens = make_inputs(B, Q, Hq, Hkv, D, [3, 90], 100, dtype, "cuda")
    mask = masks.causal(Q, device="cuda")
    torch.library.opcheck(torch.ops.pass_ext.attention_with_kv_cache.default,
                          (q, k_new, v_new, k_cache, v_cache, cache_lens, mask, 0.125, torch.empty_like(q)))


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
