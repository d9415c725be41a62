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
def test_cuda_rows_do_not_depend_on_the_batch(swiglu):
    """A row's output is bit for bit the same whatever M is and whatever the other rows hold, so one-token and
    multi-token forwards project a token identically."""
    x, w, b = make(32, 1000, 576, torch.bfloat16, "cuda", True)
    full = ops.decode_linear(x, w, b, swiglu=swiglu)
    for m in (0, 7, 8, 23, 31):
        assert torch.equal(ops.decode_linear(x[m:m + 1], w, b, swiglu=swiglu), full[m:m + 1])
    assert torch.equal(ops.decode_linear(x[:9], w, b, swiglu=swiglu), full[:9])
    other = x.clone()
    other[1:] = torch.randn_like(other[1:])
    assert torch.equal(ops.decode_linear(other, w, b, swiglu=swiglu)[0], full[0])


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
            torch.ops.pass_ext.decode_linear(*args)


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
            torch.ops.pass_ext.decode_linear(*args)
    assert not ops.decode_linear_applies(torch.randn(33, 16, **bf), w)
    assert ops.decode_linear_applies(torch.randn(4, 2, 16, **bf), w)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("swiglu", [False, True], ids=["plain", "swiglu"])
def test_opcheck(device, swiglu):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, b = make(3, 32, 64, dtype, device, True)
    out = torch.empty(3, 16 if swiglu else 32, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.pass_ext.decode_linear.default, (x, w, b, swiglu, out))


def test_linear_settings(monkeypatch):
    for name in ("PASS_EXT_LINEAR", "PASS_EXT_LINEAR_MAX_ROWS", "PASS_EXT_LINEAR_MAX_MB"):
        monkeypatch.delenv(name, raising=False)
    assert ops.linear_max_rows() == 16 and ops.linear_max_bytes() == 16 << 20
    assert ops.decode_linear_pays(torch.empty(4096, 2048, dtype=torch.bfloat16))
    assert not ops.decode_linear_pays(torch.empty(4097, 2048, dtype=torch.bfloat16))
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
