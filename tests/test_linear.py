"""decode_linear against a float64 plain-PyTorch reference, on CPU and (when built and present) CUDA: plain and
SwiGLU-gated projections, biases, ragged shapes, strided rows, row independence, CUDA graphs, argument checks
and opcheck; and the model's decode forwards with and without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pass_ext
from pass_ext import ops

HAS_CUDA = torch.cuda.is_available() and ops.has_cuda_kernels()
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda,
                                   pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")])
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")]

# (atol, rtol) against the float64 reference of the same rounded inputs: one rounding of the output (two
# for SwiGLU: gate/up, then the product) on top of float32 accumulation.
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3),
       torch.bfloat16: (3e-2, 2e-2)}
DTYPES = {"cpu": [torch.float64, torch.float32, torch.bfloat16, torch.float16],
          "cuda": [torch.bfloat16, torch.float16]}


def reference(x, w, b, swiglu):
    """float64 product (+ bias) rounded to the dtype; SwiGLU: silu(gate) * up of the rounded halves, rounded."""
    y = x.double() @ w.double().T
    if b is not None:
        y = y + b.double()
    y = y.to(x.dtype)
    if not swiglu:
        return y
    gate, up = y.double().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def make(M, N, K, dtype, device, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    b = 0.5 * torch.randn(N, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(w), cast(b)


def check(out, ref, dtype):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES["cpu"], ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 6, 8), (3, 16, 40), (5, 34, 7)])
def test_cpu_matches_reference(M, N, K, dtype, bias, swiglu):
    x, w, b = make(M, N, K, dtype, "cpu", bias)
    out = ops.decode_linear(x, w, b, swiglu=swiglu)
    assert out.shape == (M, N // 2 if swiglu else N) and out.dtype == dtype
    check(out, reference(x, w, b, swiglu), dtype)


# (M, N, K): one row to four n-tiles, K not a multiple of 32 (a partial chunk), N not a multiple of 16 (a partial
# tile), and the real models' projections (SmolLM2's qkv / gate_up / down, a Llama-8B-shaped one).
CUDA_SHAPES = [(1, 16, 64), (5, 24, 40), (8, 960, 576), (9, 3072, 576), (17, 576, 1536), (32, 40, 4104),
               (3, 6144, 4096), (25, 256, 128)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES["cuda"], ids=str)
@pytest.mark.parametrize("M,N,K", CUDA_SHAPES)
def test_cuda_matches_reference_and_cpu(M, N, K, dtype, bias, swiglu):
    x, w, b = make(M, N, K, dtype, "cuda", bias, seed=M + N + K)
    out = ops.decode_linear(x, w, b, swiglu=swiglu)
    ref = reference(x.cpu(), w.cpu(), None if b is None else b.cpu(), swiglu)
    check(out.cpu(), ref, dtype)
    # Against the CPU kernel (float sums in another order): equal but for a few outputs that round the other
    # way at a dtype boundary.
    cpu = ops.decode_linear(x.cpu(), w.cpu(), None if b is None else b.cpu(), swiglu=swiglu)
    differ = (out.cpu() != cpu).double().mean().item()
    assert differ < 0.03, f"{differ:.1%} of the outputs differ from the CPU kernel"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
@pytest.mark.parametrize("norm", [False, True], ids=["", "norm"])
def test_cuda_rows_do_not_depend_on_the_batch(swiglu, norm):
    """A row's output is bit for bit the same whatever M is and whatever the other rows hold, so one-token and
    multi-token forwards project a token identically (the RMSNorm's row statistics included)."""
    x, w, b = make(32, 1000, 576, torch.bfloat16, "cuda", True)
    kw = dict(swiglu=swiglu, norm_weight=(1 + 0.2 * x[0]).contiguous() if norm else None, eps=1e-5)
    full = ops.decode_linear(x, w, b, **kw)
    for m in (0, 7, 8, 23, 31):
        assert torch.equal(ops.decode_linear(x[m:m + 1], w, b, **kw), full[m:m + 1])
    assert torch.equal(ops.decode_linear(x[:9], w, b, **kw), full[:9])
    other = x.clone()
    other[1:] = torch.randn_like(other[1:])
    assert torch.equal(ops.decode_linear(other, w, b, **kw)[0], full[0])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_strided_rows_and_leading_dims(device):
    """x may be a view with strided rows (a slice of a wider tensor) and any leading dims."""
    dtype = torch.bfloat16
    x, w, b = make(6, 48, 64, dtype, device, True)
    wide = torch.zeros(6, 80, dtype=dtype, device=device)
    wide[:, 8:72] = x
    view = wide[:, 8:72]
    assert view.stride(0) == 80
    check(ops.decode_linear(view, w, b).cpu(), reference(x.cpu(), w.cpu(), b.cpu(), False), dtype)
    out = ops.decode_linear(x.view(2, 3, 64), w, b, swiglu=True)
    assert out.shape == (2, 3, 24)
    check(out.view(6, 24).cpu(), reference(x.cpu(), w.cpu(), b.cpu(), True), dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_cuda_graph_replay():
    x, w, b = make(4, 320, 256, torch.bfloat16, "cuda", True)
    static_x, out = x.clone(), torch.empty(4, 160, dtype=torch.bfloat16, device="cuda")
    ops.decode_linear(static_x, w, b, swiglu=True, out=out)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode_linear(static_x, w, b, swiglu=True, out=out)
    new = torch.randn_like(x)
    static_x.copy_(new)
    graph.replay()
    assert torch.equal(out, ops.decode_linear(new, w, b, swiglu=True))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("Hq", [4, 8], ids=["cuda-core-attention", "tensor-core-attention"])
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("bulk", [False, True], ids=["", "bulk"])
def test_cuda_dependent_calls_match_one_at_a_time(monkeypatch, Hq, prefetch, bulk):
    """On sm_90 each projection and attention kernel may start before the kernel before it has finished
    (programmatic dependent launch) and must wait for it before reading its output. A chain of decoder layers,
    each call reading the one before, gives the same bits launched back to back, replayed from a CUDA graph,
    and with a device sync after every call (where nothing can overlap). With prefetch_weights and
    prefetch_cache the weights, cache lengths and cached keys are read before that wait (as the model does)."""
    dt, dev = torch.bfloat16, "cuda"
    if bulk:  # every plain and SwiGLU projection through the bulk kernel (its producer streams before the wait)
        force_bulk(monkeypatch)
    g = torch.Generator().manual_seed(3)
    d, Hkv, D, ffn, S, B, layers = 256, 2, 64, 2048, 96, 2, 12
    rnd = lambda *shape, s=1.0: (s * torch.randn(*shape, generator=g)).to(dt).to(dev)  # noqa: E731
    ws = [dict(qkv=rnd((Hq + 2 * Hkv) * D, d, s=d ** -0.5), o=rnd(d, Hq * D, s=(Hq * D) ** -0.5),
               gate_up=rnd(2 * ffn, d, s=d ** -0.5), down=rnd(d, ffn, s=ffn ** -0.5),  # down: K split in a cluster
               n1=1 + rnd(d, s=0.1), n2=1 + rnd(d, s=0.1)) for _ in range(layers)]
    cos, sin = (t.to(dev) for t in rope_tables(S, D))
    lens = torch.tensor([40, 77], dtype=torch.int32, device=dev)
    positions = lens.long()
    caches = [(rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)) for _ in range(layers)]

    def linear(*args, **kw):
        return ops.decode_linear(*args, prefetch_weights=prefetch, **kw)

    def run(x, kv, sync):
        for w, (kc, vc) in zip(ws, kv):
            qkv = linear(x, w["qkv"], rope_cos=cos, rope_sin=sin, positions=positions, rope_rows=(Hq + Hkv) * D,
                         norm_weight=w["n1"], eps=1e-5)
            if sync:
                torch.cuda.synchronize()
            q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
            a = ops.attention_with_kv_cache(q.reshape(B, 1, Hq, D), k.view(B, 1, Hkv, D), v.view(B, 1, Hkv, D),
                                            kc, vc, lens, prefetch_cache=prefetch)
            if sync:
                torch.cuda.synchronize()
            x = linear(a.view(B, Hq * D), w["o"], residual=x)
            if sync:
                torch.cuda.synchronize()
            act = linear(x, w["gate_up"], swiglu=True, norm_weight=w["n2"], eps=1e-5)
            if sync:
                torch.cuda.synchronize()
            x = linear(act, w["down"], residual=x)
            if sync:
                torch.cuda.synchronize()
        return x

    x0 = rnd(B, d)
    fresh = lambda: [(kc.clone(), vc.clone()) for kc, vc in caches]  # noqa: E731
    serial = run(x0, fresh(), sync=True)
    eager = run(x0, fresh(), sync=False)
    static_x, static_kv = x0.clone(), fresh()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(static_x, static_kv, sync=False)
    graph.replay()
    torch.cuda.synchronize()
    assert serial.abs().sum() > 0
    assert torch.equal(eager, serial)
    assert torch.equal(out, serial)


def _cases(device):
    bf = dict(dtype=torch.bfloat16, device=device)
    x, w = torch.randn(2, 16, **bf), torch.randn(8, 16, **bf)
    return [
        ((torch.randn(16, **bf), w, None, False, torch.empty(2, 8, **bf)), "x must be \\[M, K\\]"),
        ((x, torch.randn(8, 12, **bf), None, False, torch.empty(2, 8, **bf)), "weight must be \\[N, K=16\\]"),
        ((x.int(), w, None, False, torch.empty(2, 8, **bf)), "x must be float32, float64, bfloat16 or float16"),
        ((x, w.half(), None, False, torch.empty(2, 8, **bf)), "weight must have x's dtype"),
        ((x, torch.randn(7, 16, **bf), None, True, torch.empty(2, 3, **bf)), "swiglu needs an even number"),
        ((x, w, torch.randn(7, **bf), False, torch.empty(2, 8, **bf)), "bias must be \\[N=8\\]"),
        ((x, w, None, False, torch.empty(2, 4, **bf)), "out must be \\[M=2, N=8\\]"),
        ((x, w, None, True, torch.empty(2, 8, **bf)), "out must be \\[M=2, N/2=4\\]"),
        ((x, w, None, False, torch.empty(8, 2, **bf).T), "out must be contiguous"),
        ((x, w.T.contiguous().T, None, False, torch.empty(2, 8, **bf)), "weight must be contiguous"),
        ((torch.randn(16, 2, **bf).T, w, None, False, torch.empty(2, 8, **bf)), "x's rows must be contiguous"),
    ]


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_bad_arguments_name_the_argument(device):
    for args, message in _cases(device):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.pass_ext.decode_linear(*args[:4], None, None, None, 0, None, 1e-6, None, args[4])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_cuda_limits_are_errors():
    bf = dict(dtype=torch.bfloat16, device="cuda")
    w = torch.randn(8, 16, **bf)
    for args, message in [
        ((torch.randn(33, 16, **bf), w, None, False, torch.empty(33, 8, **bf)), "at most 32 rows of x"),
        ((torch.randn(2, 12, **bf), torch.randn(8, 12, **bf), None, False, torch.empty(2, 8, **bf)),
         "K \\(x.size\\(1\\)\\) a multiple of 8"),
        ((torch.randn(2, 16, device="cuda"), w.float(), None, False, torch.empty(2, 8, device="cuda")),
         "bfloat16 or float16"),
        ((torch.randn(2, 20, **bf)[:, :16], w, None, False, torch.empty(2, 8, **bf)), "row stride a multiple of 8"),
        ((torch.randn(2, 24, **bf)[:, 2:18], w, None, False, torch.empty(2, 8, **bf)), "16-byte aligned"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.pass_ext.decode_linear(*args[:4], None, None, None, 0, None, 1e-6, None, args[4])
    x, out = torch.randn(2, 16, **bf), torch.empty(2, 8, **bf)
    with pytest.raises(RuntimeError, match="16-byte aligned norm_weight"):  # its loads are 16-byte vectors
        torch.ops.pass_ext.decode_linear(x, w, None, False, None, None, None, 0, torch.ones(17, **bf)[1:], 1e-6,
                                         None, out)
    assert not ops.decode_linear_applies(torch.randn(33, 16, **bf), w)
    assert ops.decode_linear_applies(torch.randn(4, 2, 16, **bf), w)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_opcheck(device, swiglu):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, b = make(3, 32, 64, dtype, device, True)
    out = torch.empty(3, 16 if swiglu else 32, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.pass_ext.decode_linear.default,
                          (x, w, b, swiglu, None, None, None, 0, None, 1e-6, None, out))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_wiring_of_every_fusion_on_cpu(tiny_hf_model, arch, monkeypatch):
    """The model's decode path with every projection through decode_linear (RMSNorm, rope, SwiGLU and residual
    adds fused) gives the unfused forward's logits; run on CPU in float32 by forcing the plan the CUDA path
    takes for small models, so the wiring is checked without a GPU."""
    import pass_ext.model as model_module
    hf = tiny_hf_model(arch, seed=7, hidden_size=96, intermediate_size=344)
    model = pass_ext.load_model(hf, dtype=torch.float32, device="cpu")
    seq = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    outs = {}
    for forced in (False, "norm", True):  # unfused; rope/SwiGLU fused, norms apart; everything fused
        monkeypatch.setenv("PASS_EXT_LINEAR_NORM", "0" if forced == "norm" else "1")
        if forced:
            monkeypatch.setattr(model_module.Model, "_linear_ops",
                                lambda self, x: dict.fromkeys(("qkv", "o", "gate_up", "down", "lm_head"), True))
        cache = model.new_cache(2, 32)
        with torch.no_grad():
            a = model(seq[:, :9], positions=torch.arange(9).expand(2, 9), cache=cache)
            cache.commit(9)
            b = model(seq[:, 9:], positions=torch.arange(9, 12).expand(2, 3), cache=cache)
        outs[forced] = torch.cat([a, b], dim=1)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(outs["norm"], outs[False], rtol=1e-4, atol=1e-4)


def rope_tables(P, D, theta=10000.0):
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    freqs = torch.outer(torch.arange(P).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rope_reference(x, w, b, cos, sin, positions, rope_rows):
    """The rounded projection, then each head of columns [0, rope_rows) rotated in float64 with cos/sin rounded
    to the dtype (as the model's fused rope chain gets them), rounded once."""
    y = reference(x, w, b, False)
    D = cos.shape[1]
    heads = y.double()[:, :rope_rows].view(y.shape[0], -1, D)
    c = cos[positions].to(x.dtype).double()[:, None]
    s = sin[positions].to(x.dtype).double()[:, None]
    rotated = torch.cat((-heads[..., D // 2:], heads[..., : D // 2]), dim=-1)
    out = y.clone()
    out[:, :rope_rows] = (heads * c + rotated * s).reshape(y.shape[0], -1).to(x.dtype)
    return out


# (M, heads q/k/v, D, K): SmolLM2's (9/3/3 x 64, d = 576) and Qwen2.5-1.5B's (12/2/2 x 128, d = 1536) fused
# projections, and a small one with rope on every head.
ROPE_SHAPES = [(1, (9, 3, 3), 64, 576), (5, (12, 2, 2), 128, 1536), (16, (2, 1, 0), 16, 40), (3, (4, 2, 2), 32, 64)]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M,heads,D,K", ROPE_SHAPES)
def test_rope_matches_reference(device, dtype, M, heads, D, K):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes bf16/fp16")
    hq, hk, hv = heads
    N, rope_rows = (hq + hk + hv) * D, (hq + hk) * D
    x, w, b = make(M, N, K, dtype, device, True, seed=M + D)
    cos, sin = rope_tables(300, D)
    positions = torch.randint(0, 300, (M,), generator=torch.Generator().manual_seed(D))
    out = ops.decode_linear(x, w, b, rope_cos=cos.to(device), rope_sin=sin.to(device), positions=positions.to(device),
                            rope_rows=rope_rows)
    ref = rope_reference(x.cpu(), w.cpu(), b.cpu(), cos, sin, positions, rope_rows)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref.double(), atol=2 * atol, rtol=2 * rtol)
    if device == "cuda":
        cpu = ops.decode_linear(x.cpu(), w.cpu(), b.cpu(), rope_cos=cos, rope_sin=sin, positions=positions,
                                rope_rows=rope_rows)
        differ = (out.cpu() != cpu).double().mean().item()
        assert differ < 0.03, f"{differ:.1%} of the outputs differ from the CPU kernel"


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_rope_bad_arguments(device):
    bf = dict(dtype=torch.bfloat16, device=device)
    x, w = torch.randn(2, 16, **bf), torch.randn(64, 16, **bf)
    cos, sin = (t.to(device) for t in rope_tables(10, 32))
    pos = torch.zeros(2, dtype=torch.long, device=device)
    out = torch.empty(2, 64, **bf)
    for args, message in [
        ((cos, None, pos, 32), "rope_cos, rope_sin and positions go together"),
        ((cos, sin, pos.int(), 32), "positions must be int64"),
        ((cos, sin, pos[:1], 32), "positions must be \\[M=2\\]"),
        ((cos, sin, pos, 48), "rope_rows must be whole heads"),
        ((cos.double(), sin.double(), pos, 32), "rope_cos must be float32"),
        ((cos, sin[:, :16], pos, 32), "rope_sin must match rope_cos"),
        ((cos[:, :32:1].t().contiguous().t(), sin, pos, 32), "rope_cos must be contiguous"),
        ((cos[:, :24].contiguous(), sin[:, :24].contiguous(), pos, 24), "weight rows N \\(64\\) must be whole heads"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.pass_ext.decode_linear(x, w, None, False, *args, None, 1e-6, None, out)
    with pytest.raises(RuntimeError, match="swiglu and the rotary embedding"):
        torch.ops.pass_ext.decode_linear(x, w, None, True, cos, sin, pos, 32, None, 1e-6, None,
                                         torch.empty(2, 32, **bf))


def rms_norm(x, weight, eps):
    """The model's RMSNorm (float statistics, the scaled row rounded, times the weight rounded)."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# (norm, residual, mode) combinations the model uses (norm + rope: qkv; o and down: residual; norm + swiglu:
# gate_up) and the rest of the grid.
FUSIONS = [(True, False, "plain"), (True, False, "swiglu"), (True, False, "rope"), (False, True, "plain"),
           (True, True, "plain")]


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("norm,residual,mode", FUSIONS)
@pytest.mark.parametrize("M,K", [(1, 576), (7, 64), (12, 264), (5, 4104)])
def test_norm_and_residual_match_reference(device, dtype, norm, residual, mode, M, K):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernel takes bf16/fp16")
    D, N = 32, 192
    x, w, b = make(M, N, K, dtype, device, True, seed=M * K)
    g = torch.Generator().manual_seed(K)
    x = (x.cpu().float() * 3 + 1).to(dtype).to(device)  # rows with a mean and a scale, as a residual stream has
    nw = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype).to(device) if norm else None
    res = torch.randn(M, N, generator=g).to(dtype).to(device) if residual else None
    kw = dict(norm_weight=nw, eps=1e-5, residual=res)
    cos, sin = rope_tables(64, D)
    positions = torch.randint(0, 64, (M,), generator=g)
    if mode == "rope":
        kw.update(rope_cos=cos.to(device), rope_sin=sin.to(device), positions=positions.to(device), rope_rows=128)
    out = ops.decode_linear(x, w, b, swiglu=mode == "swiglu", **kw)
    xc = x.cpu()
    xn = rms_norm(xc, nw.cpu(), 1e-5) if norm else xc
    if mode == "rope":
        ref = rope_reference(xn, w.cpu(), b.cpu(), cos, sin, positions, 128)
    else:
        ref = reference(xn, w.cpu(), b.cpu(), mode == "swiglu")
    if residual:
        ref = (res.cpu().double() + ref.double()).to(dtype)
    atol, rtol = TOL[dtype]
    # The normalised row is rounded before the product: an input one ulp off moves the product by ~ulp * |w|.
    torch.testing.assert_close(out.cpu().double(), ref.double(), atol=3 * atol, rtol=3 * rtol)
    if device == "cuda":
        cpu = ops.decode_linear(xc, w.cpu(), b.cpu(), swiglu=mode == "swiglu",
                                **{k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        differ = (out.cpu() != cpu).double().mean().item()
        # Summed in another order, a row's 1 / rms may be one float ulp off the CPU kernel's, which flips the
        # rounding of some normalised inputs; over K = 4104 fp16 inputs that moves ~11% of the outputs by an ulp
        # (emulated on CPU with the rms nudged by one ulp either way).
        limit = 0.05 if not norm or K <= 1024 or dtype == torch.bfloat16 else 0.25
        assert differ < limit, f"{differ:.1%} of the outputs differ from the CPU kernel"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("mode", ["plain", "residual", "swiglu"])
@pytest.mark.parametrize("K,full,part", [(64, 3.0, 0.5), (4096, 1.5, 1.1)],
                         ids=["no-K-split", "clusters-of-2-splits"])
def test_cuda_tiles_looped_by_resident_blocks(mode, K, full, part):
    """More tiles than the GPU holds blocks at once: each resident block takes several tiles, fetching the next
    tile's weights before the current one's stores. The outputs match the reference, and equal bit for bit the
    same rows computed from the weight's first tiles alone (K = 64: a grid of one tile per block; K = 4096: the
    same 2-way K split, which the launcher picks only past one wave, so both grids loop)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    M, dt = 5, torch.bfloat16
    tiles_full, tiles_part = int(full * sms), int(part * sms)
    n_full, n_part = 16 * tiles_full, 16 * tiles_part
    g = torch.Generator().manual_seed(K)
    x = torch.randn(M, K, generator=g).to(dt).cuda()
    norm = (1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda() if mode != "residual" else None
    if mode == "swiglu":  # tiles of 8 gate rows and their 8 up rows: keep the first rows of both halves
        gate, up = (torch.randn(n_full // 2, K, generator=g).to(dt).cuda() / K ** 0.5 for _ in range(2))
        w_full = torch.cat([gate, up])
        w_part = torch.cat([gate[: n_part // 2], up[: n_part // 2]])
        cols = n_part // 2
    else:
        w_full = (torch.randn(n_full, K, generator=g) / K ** 0.5).to(dt).cuda()
        w_part = w_full[:n_part]
        cols = n_part
    res = torch.randn(M, n_full, generator=g).to(dt).cuda() if mode == "residual" else None
    kw = dict(norm_weight=norm, eps=1e-5, swiglu=mode == "swiglu", prefetch_weights=True)
    out_full = ops.decode_linear(x, w_full, residual=res, **kw)
    out_part = ops.decode_linear(x, w_part, residual=None if res is None else res[:, :n_part].contiguous(), **kw)
    assert torch.equal(out_full[:, :cols], out_part)
    xn = rms_norm(x.cpu(), norm.cpu(), 1e-5) if norm is not None else x.cpu()
    ref = reference(xn, w_full.cpu(), None, mode == "swiglu")
    if res is not None:
        ref = (res.cpu().double() + ref.double()).to(dt)
    atol, rtol = TOL[dt]
    torch.testing.assert_close(out_full.cpu().double(), ref.double(), atol=3 * atol, rtol=3 * rtol)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("setting", ["PASS_EXT_LINEAR_ONE_WAVE=0", "PASS_EXT_LINEAR_STAGE_X=0", "PASS_EXT_PDL=0",
                                     "PASS_EXT_LINEAR_NORM_ROWS=1", "PASS_EXT_LINEAR_NORM_ROWS=4"])
@pytest.mark.parametrize("M", [1, 7, 8])
@pytest.mark.parametrize("swiglu", [False, True], ids=["residual", "norm-swiglu"])
def test_cuda_linear_switches_give_the_same_bits(monkeypatch, setting, M, swiglu):
    """The A/B switches (read per call) change how tiles meet blocks, where normalised x comes from, how many rows'
    norms share a round trip and whether the kernel may start before the one before it ends, not the order in
    which any output adds its products: the same bits as the defaults, over a grid of three waves."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    N, K, dt = 16 * 3 * sms, 1544, torch.bfloat16  # K: 49 chunks, a partial last batch
    x, w, b = make(M, N, K, dt, "cuda", True, seed=M)
    g = torch.Generator().manual_seed(M)
    kw = (dict(swiglu=True, norm_weight=(1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda(), eps=1e-5)
          if swiglu else dict(residual=torch.randn(M, N, generator=g).to(dt).cuda()))
    default = ops.decode_linear(x, w, b, prefetch_weights=True, **kw)
    name, value = setting.split("=")
    monkeypatch.setenv(name, value)
    switched = ops.decode_linear(x, w, b, prefetch_weights=True, **kw)
    assert default.abs().sum() > 0
    assert torch.equal(default, switched)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("mode", ["plain", "swiglu", "rope"])
@pytest.mark.parametrize("M,N,K", [(1, 4096, 576), (8, 2048, 576), (13, 1024, 1544), (25, 512, 576),
                                   (1, 128, 8192), (3, 128, 4104), (8, 1024, 4096)],
                         ids=["one-row", "one-n-tile", "two-n-tiles", "four-n-tiles", "K-split-8",
                              "K-split-ragged", "over-the-stage-budget"])
def test_cuda_staged_norm_gives_the_same_bits(monkeypatch, mode, M, N, K):
    """With the RMSNorm, a block normalises x once into shared memory (where M rows of K fit) and its tiles read
    it from there: the same bits as normalising in every tile's loads (PASS_EXT_LINEAR_STAGE_X=0), for every
    n-tile count, K split over clusters (K = 8192 with few tiles; a ragged last chunk at K = 4104), x rows with
    a stride, and a size past the budget (both paths unstaged there), and near the float64 reference."""
    dt, g = torch.bfloat16, torch.Generator().manual_seed(M * K + N)
    big = torch.randn(M, K + 24, generator=g).to(dt)
    x = big.cuda()[:, 8:8 + K]  # rows K + 24 elements apart, 16-byte aligned
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dt).cuda()
    b = (0.5 * torch.randn(N, generator=g)).to(dt).cuda()
    norm = (1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda()
    kw = dict(norm_weight=norm, eps=1e-5, prefetch_weights=True)
    if mode == "swiglu":
        kw["swiglu"] = True
    elif mode == "rope":
        D = 64
        cos, sin = rope_tables(512, D)
        positions = torch.randint(0, 512, (M,), generator=g)
        kw.update(rope_cos=cos.cuda(), rope_sin=sin.cuda(), positions=positions.cuda(), rope_rows=N - D)
    staged = ops.decode_linear(x, w, b, **kw)
    monkeypatch.setenv("PASS_EXT_LINEAR_STAGE_X", "0")
    unstaged = ops.decode_linear(x, w, b, **kw)
    assert staged.abs().sum() > 0
    assert torch.equal(staged, unstaged)
    if mode != "rope":
        xn = rms_norm(x.cpu(), norm.cpu(), 1e-5)
        ref = reference(xn, w.cpu(), b.cpu(), mode == "swiglu")
        atol, rtol = TOL[dt]
        torch.testing.assert_close(staged.cpu().double(), ref.double(), atol=3 * atol, rtol=3 * rtol)


def force_bulk(monkeypatch):
    """Every plain and SwiGLU call through the bulk kernel, whatever its size, row length and rows (by default it
    takes up to 8 rows, K >= 1024 and weights of 16 MiB and more)."""
    for name, value in (("PASS_EXT_LINEAR_BULK_MIN_MB", "0"), ("PASS_EXT_LINEAR_BULK_MIN_K", "0"),
                        ("PASS_EXT_LINEAR_BULK_MAX_ROWS", "16")):
        monkeypatch.setenv(name, value)


# The bulk kernel (force_bulk sends every size there): one row to
# two n-tiles, a partial tile (N), K past one 512-column stage with a ragged last stage and a partial 32-chunk,
# more tiles than the GPU has blocks (each block loops; its ring runs across tiles), the 1.5B's down shape.
BULK_SHAPES = [(1, 16, 64), (5, 40, 520), (8, 4000, 1536), (9, 300, 1544), (16, 1024, 4104), (3, 1536, 8960)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("fusion", ["plain", "bias", "residual", "swiglu", "norm-swiglu", "norm-residual"])
@pytest.mark.parametrize("M,N,K", BULK_SHAPES)
def test_cuda_bulk_matches_reference_and_rows_do_not_depend_on_the_batch(monkeypatch, fusion, M, N, K):
    """The bulk kernel against the float64 reference for every fusion the model uses on it, and each row bit for
    bit the row computed alone (a one-token forward projects a token as a multi-token forward does)."""
    force_bulk(monkeypatch)
    dt, g = torch.bfloat16, torch.Generator().manual_seed(M * N + K)
    x, w, b = make(M, N, K, dt, "cuda", fusion == "bias", seed=M + N + K)
    swiglu = "swiglu" in fusion
    norm = (1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda() if fusion.startswith("norm") else None
    res = torch.randn(M, N, generator=g).to(dt).cuda() if "residual" in fusion else None
    kw = dict(swiglu=swiglu, norm_weight=norm, eps=1e-5, prefetch_weights=True)
    out = ops.decode_linear(x, w, b, residual=res, **kw)
    xn = rms_norm(x.cpu(), norm.cpu(), 1e-5) if norm is not None else x.cpu()
    ref = reference(xn, w.cpu(), None if b is None else b.cpu(), swiglu)
    if res is not None:
        ref = (res.cpu().double() + ref.double()).to(dt)
    atol, rtol = TOL[dt]
    torch.testing.assert_close(out.cpu().double(), ref.double(), atol=3 * atol, rtol=3 * rtol)
    for m in range(M):
        one = ops.decode_linear(x[m:m + 1], w, b, residual=None if res is None else res[m:m + 1].contiguous(), **kw)
        assert torch.equal(one, out[m:m + 1])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("M", [1, 8, 13])
@pytest.mark.parametrize("fusion", ["residual", "norm-swiglu"])
def test_cuda_bulk_gives_the_tile_kernels_bits(monkeypatch, M, fusion):
    """Where decode_linear_kernel does not split K (tiles past two waves of blocks) the bulk kernel adds every
    product in the same order: the same bits with PASS_EXT_LINEAR_BULK=0 (bulk off) as with the bulk kernel,
    with the default size limits, which send this 1.5B gate/up-shaped weight (55 MB) to it."""
    N, K, dt = 2 * 8960, 1536, torch.bfloat16
    x, w, b = make(M, N, K, dt, "cuda", True, seed=M)
    g = torch.Generator().manual_seed(M)
    kw = (dict(swiglu=True, norm_weight=(1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda(), eps=1e-5)
          if fusion == "norm-swiglu" else dict(residual=torch.randn(M, N, generator=g).to(dt).cuda()))
    monkeypatch.delenv("PASS_EXT_LINEAR_BULK_MIN_MB", raising=False)
    monkeypatch.setenv("PASS_EXT_LINEAR_BULK_MAX_ROWS", "16")  # the default is 8 rows
    bulk = ops.decode_linear(x, w, b, prefetch_weights=True, **kw)
    monkeypatch.setenv("PASS_EXT_LINEAR_BULK", "0")
    tiles = ops.decode_linear(x, w, b, prefetch_weights=True, **kw)
    assert bulk.abs().sum() > 0
    assert torch.equal(bulk, tiles)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("M,K", [(1, 1536), (3, 4104), (7, 1544), (12, 8960)],
                         ids=["one-row", "ragged-stage", "staged-7", "over-the-stage-budget"])
@pytest.mark.parametrize("fusion", ["residual", "norm-swiglu", "norm"])
def test_cuda_bulk_staging_gives_the_same_bits(monkeypatch, M, K, fusion):
    """x staged once per block (normalised, with the norm) or read from L1 per tile (PASS_EXT_LINEAR_STAGE_X=0):
    the same order of additions, so the same bits."""
    force_bulk(monkeypatch)
    N, dt, g = 2 * 4 * 132, torch.bfloat16, torch.Generator().manual_seed(M * K)
    x, w, b = make(M, N, K, dt, "cuda", True, seed=K)
    norm = (1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda() if "norm" in fusion else None
    res = torch.randn(M, N, generator=g).to(dt).cuda() if fusion == "residual" else None
    kw = dict(swiglu="swiglu" in fusion, norm_weight=norm, eps=1e-5, residual=res, prefetch_weights=True)
    default = ops.decode_linear(x, w, b, **kw)
    monkeypatch.setenv("PASS_EXT_LINEAR_STAGE_X", "0")
    assert torch.equal(ops.decode_linear(x, w, b, **kw), default)
    assert default.abs().sum() > 0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("fusion", ["residual", "norm-swiglu"])
def test_cuda_bulk_splits_k_over_a_cluster(monkeypatch, M, fusion):
    """Few tiles and a long K: the bulk kernel splits K over a cluster per tile, as decode_linear_kernel does.
    With the same splits (32 tiles, K = 8192: 8 each) the same bits as that kernel; with fewer (the 1.5B's down
    shape: 2 against 4) and without splits (PASS_EXT_LINEAR_BULK_SPLITS=0) near the reference, rows independent."""
    force_bulk(monkeypatch)
    dt = torch.bfloat16
    for N, K, same in ((16 * 32, 8192, True), (1536, 8960, False)):
        g = torch.Generator().manual_seed(N + K + M)
        n = N  # weight rows (SwiGLU: N / 2 outputs), so that both fusions make N / 16 tiles
        x, w, b = make(M, n, K, dt, "cuda", True, seed=M + K)
        kw = (dict(swiglu=True, norm_weight=(1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda(), eps=1e-5)
              if fusion == "norm-swiglu" else dict(residual=torch.randn(M, n, generator=g).to(dt).cuda()))
        split = ops.decode_linear(x, w, b, prefetch_weights=True, **kw)
        for m in range(M):
            one = {k: (v[m:m + 1].contiguous() if k == "residual" else v) for k, v in kw.items()}
            assert torch.equal(ops.decode_linear(x[m:m + 1], w, b, prefetch_weights=True, **one), split[m:m + 1])
        monkeypatch.setenv("PASS_EXT_LINEAR_BULK_SPLITS", "0")
        whole = ops.decode_linear(x, w, b, prefetch_weights=True, **kw)
        monkeypatch.delenv("PASS_EXT_LINEAR_BULK_SPLITS")
        monkeypatch.setenv("PASS_EXT_LINEAR_BULK", "0")
        tiles = ops.decode_linear(x, w, b, prefetch_weights=True, **kw)
        monkeypatch.delenv("PASS_EXT_LINEAR_BULK")
        if same:
            assert torch.equal(split, tiles)
        xn = rms_norm(x.cpu(), kw["norm_weight"].cpu(), 1e-5) if "norm_weight" in kw else x.cpu()
        ref = reference(xn, w.cpu(), b.cpu(), "swiglu" in kw)
        if "residual" in kw:
            ref = (kw["residual"].cpu().double() + ref.double()).to(dt)
        atol, rtol = TOL[dt]
        for out in (split, whole):
            torch.testing.assert_close(out.cpu().double(), ref.double(), atol=3 * atol, rtol=3 * rtol)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_cuda_bulk_graph_replay(monkeypatch):
    """A captured bulk call replays with new inputs (its barriers start over in every launch)."""
    force_bulk(monkeypatch)
    x, w, b = make(4, 2 * 2048, 1032, torch.bfloat16, "cuda", True)
    static_x, out = x.clone(), torch.empty(4, 2048, dtype=torch.bfloat16, device="cuda")
    ops.decode_linear(static_x, w, b, swiglu=True, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.decode_linear(static_x, w, b, swiglu=True, out=out)
    for _ in range(3):
        new = torch.randn_like(x)
        static_x.copy_(new)
        graph.replay()
        assert torch.equal(out, ops.decode_linear(new, w, b, swiglu=True))


# (M, heads q/k/v, D, K) through the bulk kernel's rotary epilogue: one head pair per tile row group, a ragged last
# stage (K 520) with rope on every head, Qwen2.5-1.5B's layout, Llama-8B's qkv (384 tiles, K 4096: the 1024-column
# ring), a row past a block's tiles at 8 rows.
BULK_ROPE_SHAPES = [(1, (1, 1, 0), 16, 64), (5, (4, 2, 0), 32, 520), (3, (12, 2, 2), 128, 1536),
                    (1, (32, 8, 8), 128, 4096), (8, (32, 8, 8), 128, 4096)]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("norm", [False, True], ids=["rope", "norm-rope"])
@pytest.mark.parametrize("M,heads,D,K", BULK_ROPE_SHAPES)
def test_cuda_bulk_rope_matches_reference_and_rows_do_not_depend_on_the_batch(monkeypatch, norm, M, heads, D, K):
    """The fused q/k/v projection with its rotary embedding on the bulk kernel: near the float64 reference, each
    row bit for bit the row alone, and x staged or not the same bits."""
    force_bulk(monkeypatch)
    hq, hk, hv = heads
    N, rope_rows, dt = (hq + hk + hv) * D, (hq + hk) * D, torch.bfloat16
    x, w, b = make(M, N, K, dt, "cuda", True, seed=M + K)
    g = torch.Generator().manual_seed(D + K)
    cos, sin = rope_tables(4096, D)
    positions = torch.randint(0, 4096, (M,), generator=g)
    nw = (1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda() if norm else None
    kw = dict(rope_cos=cos.cuda(), rope_sin=sin.cuda(), rope_rows=rope_rows, norm_weight=nw, eps=1e-5,
              prefetch_weights=True)
    out = ops.decode_linear(x, w, b, positions=positions.cuda(), **kw)
    xn = rms_norm(x.cpu(), nw.cpu(), 1e-5) if norm else x.cpu()
    ref = rope_reference(xn, w.cpu(), b.cpu(), cos, sin, positions, rope_rows)
    atol, rtol = TOL[dt]
    torch.testing.assert_close(out.cpu().double(), ref.double(), atol=3 * atol, rtol=3 * rtol)
    for m in range(M):
        one = ops.decode_linear(x[m:m + 1], w, b, positions=positions[m:m + 1].cuda(), **kw)
        assert torch.equal(one, out[m:m + 1])
    monkeypatch.setenv("PASS_EXT_LINEAR_STAGE_X", "0")
    assert torch.equal(ops.decode_linear(x, w, b, positions=positions.cuda(), **kw), out)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("M,N,K", [(1, 4000, 4096), (8, 300, 1544), (5, 40, 520), (3, 16 * 32, 8192),
                                   (2, 1536, 8960)],
                         ids=["whole-stages", "ragged-stage", "one-stage", "split-8", "split-2-ragged"])
@pytest.mark.parametrize("fusion", ["residual", "norm-swiglu", "norm-rope"])
def test_cuda_bulk_rings_give_the_same_bits(monkeypatch, M, N, K, fusion):
    """The bulk kernel's two rings (512 x 4 and 1024 x 2 columns x stages, PASS_EXT_LINEAR_BULK_RING) feed each
    warp the same chunks in the same order: the same bits, with whole and ragged stages and K split over a
    cluster; and the default (the 1024 ring only where K is a multiple of 1024) gives them too."""
    force_bulk(monkeypatch)
    dt, g = torch.bfloat16, torch.Generator().manual_seed(M * K)
    D = 16
    x, w, b = make(M, N if fusion != "norm-rope" else N // D * D, K, dt, "cuda", True, seed=N + K)
    n = w.shape[0]
    kw = dict(prefetch_weights=True)
    if fusion == "residual":
        kw["residual"] = torch.randn(M, n, generator=g).to(dt).cuda()
    else:
        kw.update(norm_weight=(1 + 0.2 * torch.randn(K, generator=g)).to(dt).cuda(), eps=1e-5)
        if fusion == "norm-swiglu":
            kw["swiglu"] = True
        else:
            cos, sin = rope_tables(64, D)
            kw.update(rope_cos=cos.cuda(), rope_sin=sin.cuda(), rope_rows=n - D,
                      positions=torch.randint(0, 64, (M,), generator=g).cuda())
    outs = {}
    for ring in ("512", "1024", "0"):
        monkeypatch.setenv("PASS_EXT_LINEAR_BULK_RING", ring)
        outs[ring] = ops.decode_linear(x, w, b, **kw)
    assert outs["512"].abs().sum() > 0
    assert torch.equal(outs["1024"], outs["512"]) and torch.equal(outs["0"], outs["512"])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_cuda_bulk_ring_setting_is_checked(monkeypatch):
    force_bulk(monkeypatch)
    x, w, _ = make(1, 64, 1024, torch.bfloat16, "cuda", False)
    for bad in ("700", "2048", "-1", "wide"):
        monkeypatch.setenv("PASS_EXT_LINEAR_BULK_RING", bad)
        with pytest.raises(RuntimeError, match="PASS_EXT_LINEAR_BULK_RING must be"):
            ops.decode_linear(x, w)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_norm_and_residual_bad_arguments(device):
    bf = dict(dtype=torch.bfloat16, device=device)
    x, w, out = torch.randn(2, 16, **bf), torch.randn(8, 16, **bf), torch.empty(2, 8, **bf)
    nw, res = torch.ones(16, **bf), torch.randn(2, 8, **bf)
    call = torch.ops.pass_ext.decode_linear
    for kwargs, message in [
        (dict(norm=nw[:8]), "norm_weight must be \\[K=16\\]"),
        (dict(norm=nw.half()), "norm_weight must have x's dtype"),
        (dict(norm=nw, eps=-1.0), "eps must be a finite number >= 0"),
        (dict(norm=nw, eps=float("nan")), "eps must be a finite number >= 0"),
        (dict(res=res[:, :4].contiguous()), "residual must be \\[M=2, N=8\\]"),
        (dict(res=res.half()), "residual must have x's dtype"),
        (dict(res=torch.randn(8, 2, **bf).T), "residual must be contiguous"),
        (dict(res=res, swiglu=True), "residual goes with the plain product only"),
    ]:
        swiglu = kwargs.get("swiglu", False)
        o = torch.empty(2, 4, **bf) if swiglu else out
        with pytest.raises(RuntimeError, match=message):
            call(x, w, None, swiglu, None, None, None, 0, kwargs.get("norm"), kwargs.get("eps", 1e-6),
                 kwargs.get("res"), o)


def test_linear_settings(monkeypatch):
    for name in ("PASS_EXT_LINEAR", "PASS_EXT_LINEAR_MAX_ROWS", "PASS_EXT_LINEAR_MAX_MB",
                 "PASS_EXT_LINEAR_ONE_ROW_MAX_MB"):
        monkeypatch.delenv(name, raising=False)
    assert ops.linear_max_rows() == 16 and ops.linear_max_bytes() == 64 << 20
    assert ops.decode_linear_pays(torch.empty(16384, 2048, dtype=torch.bfloat16))
    assert not ops.decode_linear_pays(torch.empty(16385, 2048, dtype=torch.bfloat16))
    # One-row forwards: up to 320 MiB where K is a multiple of 1024 (Llama-8B's gate/up and down, Qwen2.5-14B's
    # 270 MiB gate/up; not the 8B's 1002 MiB lm_head, a ragged K or more rows).
    meta = lambda n, k: torch.empty(n, k, dtype=torch.bfloat16, device="meta")  # noqa: E731
    assert ops.linear_one_row_max_bytes() == 320 << 20
    assert ops.decode_linear_pays(meta(27648, 5120), one_row=True)
    assert ops.decode_linear_pays(meta(32768, 5120), one_row=True)  # 320 MiB exactly
    assert not ops.decode_linear_pays(meta(32769, 5120), one_row=True)
    assert ops.decode_linear_pays(meta(28672, 4096), one_row=True)
    assert ops.decode_linear_pays(meta(4096, 14336), one_row=True)
    assert not ops.decode_linear_pays(meta(28672, 4096), one_row=False)
    assert not ops.decode_linear_pays(meta(128256, 4096), one_row=True)
    assert not ops.decode_linear_pays(meta(5120, 13824), one_row=True)  # K = 13.5 x 1024
    monkeypatch.setenv("PASS_EXT_LINEAR_ONE_ROW_MAX_MB", "0")
    assert not ops.decode_linear_pays(meta(28672, 4096), one_row=True)
    monkeypatch.setenv("PASS_EXT_LINEAR_MAX_ROWS", "32")
    monkeypatch.setenv("PASS_EXT_LINEAR_MAX_MB", "1024")
    assert ops.linear_max_rows() == 32 and ops.linear_max_bytes() == 1 << 30
    monkeypatch.setenv("PASS_EXT_LINEAR", "0")
    assert ops.linear_max_rows() == 0
    monkeypatch.delenv("PASS_EXT_LINEAR")
    for bad in ("33", "-1", "many"):
        monkeypatch.setenv("PASS_EXT_LINEAR_MAX_ROWS", bad)
        with pytest.raises(ValueError, match="PASS_EXT_LINEAR_MAX_ROWS must be an integer in \\[0, 32\\]"):
            ops.linear_max_rows()
    monkeypatch.setenv("PASS_EXT_LINEAR_MAX_MB", "-2")
    with pytest.raises(ValueError, match="PASS_EXT_LINEAR_MAX_MB must be an integer"):
        ops.linear_max_bytes()
    for name, switch in (("PASS_EXT_LINEAR_NORM", ops.linear_fuses_norm), ("PASS_EXT_PREFETCH", ops.prefetch_allowed)):
        monkeypatch.delenv(name, raising=False)
        assert switch()
        monkeypatch.setenv(name, "0")
        assert not switch()
        monkeypatch.setenv(name, "on")
        with pytest.raises(ValueError, match=f"{name} must be '0' or '1'"):
            switch()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_decode_with_and_without_the_op(tiny_hf_model, arch, monkeypatch):
    """bf16 decode forwards (<= 32 tokens) project through decode_linear, prefill (more) through torch's linear;
    both give transformers' logits to bf16 noise, and PASS_EXT_LINEAR=0 gives the same logits to bf16 noise."""
    hf = tiny_hf_model(arch, seed=5, hidden_size=96, intermediate_size=344)
    model = pass_ext.load_model(hf, dtype=torch.bfloat16, device="cuda")
    seq = torch.randint(0, 64, (2, 45), generator=torch.Generator().manual_seed(2)).cuda()
    outs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("PASS_EXT_LINEAR", setting)
        cache = model.new_cache(2, 64)
        with torch.no_grad():
            prefill = seq[:, :40]
            assert not model._linear_ops(model.embed(prefill))
            a = model(prefill, positions=torch.arange(40, device="cuda").expand(2, 40), cache=cache)
            cache.commit(40)
            step = seq[:, 40:45]
            plan = model._linear_ops(model.embed(step))
            assert all(plan.values()) and len(plan) == 5 if setting == "1" else not plan
            b = model(step, positions=torch.arange(40, 45, device="cuda").expand(2, 5), cache=cache)
        outs[setting] = torch.cat([a, b], dim=1)
    torch.testing.assert_close(outs["1"], outs["0"], rtol=0.05, atol=0.05)
    with torch.no_grad():
        ref = hf.to(device="cuda", dtype=torch.bfloat16)(seq).logits.float()
    torch.testing.assert_close(outs["1"], ref, rtol=0.05, atol=0.1)


def test_bench_linear_arguments():
    """bench/bench_linear.py names a bad argument's allowed values (and, without a GPU, says it needs one)."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_linear.py"
    for argv, message in [(["--rows", "1,40"], "--rows must be integers in [1, 32]"),
                          (["--models", "gpt-2"], "--models: unknown model 'gpt-2'")]:
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "needs a GPU" in proc.stderr
