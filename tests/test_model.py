"""The decoder against transformers on tiny random Llama/Qwen2/Mistral models: prefill, cached decode steps,
rollback, tree masks, ragged batches, the differentiable attention path, capacity and cache bookkeeping."""
from __future__ import annotations

import pytest
import torch

import pass_ext
from pass_ext import masks
from conftest import record_parity

TOL = dict(rtol=1e-4, atol=1e-4)


def hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T, V] float32, one plain causal forward."""
    with torch.no_grad():
        return hf(ids).logits.float()


def run(model, cache, ids, start, **kw):
    """Forward ids [B, Q] at positions start.. (start: int or [B])."""
    B, Q = ids.shape
    start = torch.as_tensor(start).reshape(-1, 1).expand(B, 1)
    return model(ids, start + torch.arange(Q)[None], cache, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_prefill_and_decode_match_transformers(tiny_hf_model, arch):
    hf = tiny_hf_model(arch, seed=1)
    model = pass_ext.load_model(hf, dtype=torch.float32, device="cpu")
    if arch == "qwen2":
        assert model.config.attention_bias and model.layers[0].bqkv is not None
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 64, (2, 40), generator=g)
    ref = hf_logits(hf, seq)
    cache = model.new_cache(2, 48)
    pos, outs = 0, []
    for q in (11, 1, 3, 5, 1, 5, 3):  # prefill, then decode steps of several sizes
        outs.append(run(model, cache, seq[:, pos:pos + q], pos))
        cache.commit(torch.full((2,), q))
        pos += q
    out = torch.cat(outs, dim=1)
    record_parity(f"tiny {arch} (cached steps)", out, ref[:, :pos])
    torch.testing.assert_close(out, ref[:, :pos], **TOL)
    assert cache.lens.tolist() == [pos, pos]


def test_rollback_equals_committed_sequence(tiny_hf_model):
    """Uncommitted tokens (here: wrong ones) leave no trace: later steps see only the committed sequence."""
    hf = tiny_hf_model("llama", seed=2)
    model = pass_ext.load_model(hf, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 64, (1, 30), generator=g)
    ref = hf_logits(hf, seq)
    cache = model.new_cache(1, 40)
    run(model, cache, seq[:, :10], 0)
    cache.commit(torch.tensor([10]))
    pos = 10
    for keep, q in ((2, 5), (0, 3), (3, 3), (1, 5)):
        junk = torch.randint(0, 64, (1, q - keep), generator=g)
        step = torch.cat([seq[:, pos:pos + keep], junk], dim=1)
        out = run(model, cache, step, pos)
        torch.testing.assert_close(out[:, :keep], ref[:, pos:pos + keep], **TOL)
        cache.commit(torch.tensor([keep]))
        pos += keep
    out = run(model, cache, seq[:, pos:pos + 4], pos)
    record_parity("tiny llama (after rollbacks)", out, ref[:, pos:pos + 4])
    torch.testing.assert_close(out, ref[:, pos:pos + 4], **TOL)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(tiny_hf_model, scaling):
    hf = tiny_hf_model("llama", seed=3, rope_scaling=dict(scaling, rope_theta=500000.0))
    model = pass_ext.load_model(hf, device="cpu")
    assert model.config.rope_scaling["rope_type"] == scaling["rope_type"]
    assert model.config.rope_theta == 500000.0
    seq = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(2))
    out = run(model, model.new_cache(1, 64), seq, 0)
    torch.testing.assert_close(out, hf_logits(hf, seq), **TOL)


def test_unknown_rope_type_and_arch_raise(tiny_hf_model):
    hf = tiny_hf_model("llama")
    cfg = pass_ext.ModelConfig.from_hf(hf.config)
    bad = dict(cfg.__dict__, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn.*default, linear, llama3"):
        pass_ext.ModelConfig(**bad)
    with pytest.raises(ValueError, match="gemma3.*llama, mistral, qwen2"):
        pass_ext.ModelConfig(**dict(cfg.__dict__, arch="gemma3"))
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="gpt2.*llama, mistral, qwen2"):
        pass_ext.load_model(gpt2)


def fused_inputs(model, prefix_len: int, k: int, g: torch.Generator):
    """A fused-mode block (DESIGN 1.2): [c, d_1..d_k] then k+1 groups of k look-ahead embeddings."""
    c_d = torch.randint(0, 64, (1, k + 1), generator=g)
    la = 0.5 * torch.randn(k, model.config.hidden_size, generator=g)
    mask, offsets = masks.fused_layout(k)
    embeds = torch.cat([model.embed(c_d)[0], la.repeat(k + 1, 1)])[None]  # [1, (k+1)^2, d]
    return c_d, la, mask, prefix_len + offsets[None], embeds


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["op", "torch"])
def test_fused_tree_mask_equals_linear_sequences(tiny_hf_model, arch, attention):
    """Each look-ahead group under the fused mask sees exactly what a plain causal forward on
    prefix + c..d_j + group would see."""
    hf = tiny_hf_model(arch, seed=4)
    model = pass_ext.load_model(hf, device="cpu")
    g = torch.Generator().manual_seed(3)
    k, P = 3, 9
    prefix = torch.randint(0, 64, (1, P), generator=g)
    c_d, la, mask, positions, embeds = fused_inputs(model, P, k, g)
    cache = model.new_cache(1, 64)
    run(model, cache, prefix, 0)
    cache.commit(torch.tensor([P]))
    packed = masks.pack(mask)
    out = model(None, positions, cache, tree_mask=packed, inputs_embeds=embeds, attention=attention)
    assert out.shape == (1, (k + 1) ** 2, 64)
    for j in range(k + 1):
        # Plain causal forward over [prefix, c..d_j, LA_1..LA_k] in a fresh cache.
        lin = torch.cat([model.embed(prefix)[0], model.embed(c_d[:, :j + 1])[0], la])[None]
        ref = model(None, torch.arange(lin.shape[1])[None], model.new_cache(1, 64), inputs_embeds=lin)
        got = torch.cat([out[:, :j + 1], out[:, k + 1 + j * k: k + 1 + (j + 1) * k]], dim=1)
        torch.testing.assert_close(got, ref[:, P:], **TOL)
    # The same block from token ids (no look-ahead) equals transformers: the real tokens are causal.
    torch.testing.assert_close(out[:, :k + 1], hf_logits(hf, torch.cat([prefix, c_d], 1))[:, P:], **TOL)
    # A bool mask is accepted too.
    cache.lens.fill_(P)
    out_bool = model(None, positions, cache, tree_mask=mask, inputs_embeds=embeds, attention=attention)
    torch.testing.assert_close(out_bool, out, rtol=0, atol=0)


def test_ragged_batch_equals_rows_alone(tiny_hf_model):
    hf = tiny_hf_model("qwen2", seed=5)
    model = pass_ext.load_model(hf, device="cpu")
    g = torch.Generator().manual_seed(4)
    lens = [3, 12, 7]
    seqs = [torch.randint(0, 64, (1, n + 5), generator=g) for n in lens]
    batch = model.new_cache(3, 32)
    for b, n in enumerate(lens):  # prefill each row alone into the batch cache, then one ragged step
        one = model.new_cache(1, 32)
        run(model, one, seqs[b][:, :n], 0)
        for layer in range(model.config.num_layers):
            batch.k[layer][b], batch.v[layer][b] = one.k[layer][0], one.v[layer][0]
    batch.commit(torch.tensor(lens))
    step = torch.cat([s[:, n:] for s, n in zip(seqs, lens)])  # [3, 5]
    mask = masks.causal(5)
    for attention in ("op", "torch"):
        out = run(model, batch, step, torch.tensor(lens), attention=attention, tree_mask=mask)
        for b, n in enumerate(lens):
            torch.testing.assert_close(out[b], hf_logits(hf, seqs[b])[0, n:], **TOL)


def test_torch_attention_matches_op_and_is_differentiable(tiny_hf_model):
    hf = tiny_hf_model("qwen2", seed=6)
    model = pass_ext.load_model(hf, device="cpu")
    assert all(not p.requires_grad for p in model.parameters())
    g = torch.Generator().manual_seed(5)
    k, P = 2, 6
    prefix = torch.randint(0, 64, (2, P), generator=g)
    caches = {}
    outs = {}
    for attention in ("op", "torch"):
        cache = model.new_cache(2, 32)
        run(model, cache, prefix, 0, attention=attention)
        cache.commit(torch.tensor([P, P - 2]))  # ragged commit
        c_d, la, mask, positions, embeds = fused_inputs(model, P, k, torch.Generator().manual_seed(6))
        embeds = embeds.expand(2, -1, -1).clone().requires_grad_(attention == "torch")
        outs[attention] = model(None, positions.expand(2, -1) - torch.tensor([[0], [2]]), cache,
                                tree_mask=masks.pack(mask), inputs_embeds=embeds, attention=attention)
        caches[attention] = cache
        if attention == "torch":
            outs[attention].logsumexp(-1).sum().backward()
            assert embeds.grad is not None and embeds.grad.abs().sum() > 0
            assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(outs["torch"].detach(), outs["op"], **TOL)
    for a, b in zip(caches["op"].k + caches["op"].v, caches["torch"].k + caches["torch"].v):
        torch.testing.assert_close(a, b, **TOL)


def test_return_hidden_and_lm_head(tiny_hf_model):
    model = pass_ext.load_model(tiny_hf_model("llama", seed=7, tie_word_embeddings=True), device="cpu")
    assert model.config.tie_word_embeddings and model.lm_head is None
    ids = torch.randint(0, 64, (2, 5))
    hidden = run(model, model.new_cache(2, 8), ids, 0, return_hidden=True)
    logits = run(model, model.new_cache(2, 8), ids, 0)
    assert hidden.shape == (2, 5, 48) and logits.dtype == torch.float32
    torch.testing.assert_close(model.lm_head_logits(hidden), logits, rtol=0, atol=0)


@pytest.mark.parametrize("attention", ["op", "torch"])
def test_capacity_overflow_raises_and_writes_nothing(tiny_hf_model, attention):
    model = pass_ext.load_model(tiny_hf_model("llama", seed=8), device="cpu")
    cache = model.new_cache(2, 10)
    run(model, cache, torch.randint(0, 64, (2, 6)), 0)
    cache.commit(torch.tensor([6, 4]))
    before = [t.clone() for t in cache.k + cache.v]
    with pytest.raises(RuntimeError, match="capacity"):
        run(model, cache, torch.randint(0, 64, (2, 5)), torch.tensor([6, 4]), attention=attention)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.k + cache.v))
    assert cache.lens.tolist() == [6, 4]
    run(model, cache, torch.randint(0, 64, (2, 4)), torch.tensor([6, 4]), attention=attention)  # exactly fits


def test_cache_bookkeeping(tiny_hf_model):
    model = pass_ext.load_model(tiny_hf_model("llama"), device="cpu")
    cache = model.new_cache(3, 17)
    assert cache.capacity == 17 and cache.batch_size == 3
    assert len(cache.k) == len(cache.v) == model.config.num_layers
    assert cache.k[0].shape == (3, model.config.num_kv_heads, 17, model.config.head_dim)
    assert cache.lens.dtype == torch.int32 and cache.lens.device == model.device
    cache.commit(torch.tensor([1, 2, 3]))
    cache.commit(torch.tensor([1, 0, 2], dtype=torch.int32))
    assert cache.lens.tolist() == [2, 2, 5] and cache.lens.dtype == torch.int32
    cache.reset()
    assert cache.lens.tolist() == [0, 0, 0]
    for bad in ((0, 4), (2, 0), (-1, 4)):
        with pytest.raises(ValueError):
            model.new_cache(*bad)


def test_positions_beyond_max_position_embeddings(tiny_hf_model):
    """Rope tables grow with the cache (look-ahead positions may run past the last slot)."""
    hf = tiny_hf_model("llama", seed=9, max_position_embeddings=16)
    model = pass_ext.load_model(hf, device="cpu")
    seq = torch.randint(0, 64, (1, 40))
    out = run(model, model.new_cache(1, 40), seq, 0)
    torch.testing.assert_close(out, hf_logits(hf, seq), **TOL)


def test_bfloat16_and_fingerprint(tiny_hf_model):
    hf = tiny_hf_model("qwen2", seed=10)
    f32 = pass_ext.load_model(hf, dtype=torch.float32, device="cpu")
    bf16 = pass_ext.load_model(hf, dtype=torch.bfloat16, device="cpu")
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cpu"
    assert f32.fingerprint == bf16.fingerprint and len(f32.fingerprint) == 16
    assert pass_ext.load_model(tiny_hf_model("qwen2", seed=11), device="cpu").fingerprint != f32.fingerprint
    ids = torch.randint(0, 64, (1, 8))
    a = run(f32, f32.new_cache(1, 8), ids, 0)
    b = run(bf16, bf16.new_cache(1, 8), ids, 0)
    assert b.dtype == torch.float32 and b.isfinite().all()
    assert (a - b).norm() / a.norm() < 0.05
    assert f32.lookahead is None and f32.name is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_chains_match_eager_cuda(tiny_hf_model, arch, dtype, monkeypatch):
    """CUDA forwards run the norms, rotary embedding, SwiGLU and residual adds as torch.compile'd kernels
    (PASS_EXT_FUSE, default on); they give the eager chains' logits (float32: to rounding; bf16: to bf16 noise),
    at prefill and at decode sizes, with and without a tree mask."""
    hf = tiny_hf_model(arch, seed=3)
    model = pass_ext.load_model(hf, dtype=dtype, device="cuda")
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, 64, (3, 30), generator=g).cuda()
    tree = masks.fused_layout(2)[0].cuda()
    outs = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("PASS_EXT_FUSE", fuse)
        cache = model.new_cache(3, 64)
        with torch.no_grad():
            a = run(model, cache, seq[:, :21], 0)
            cache.commit(torch.full((3,), 21, device="cuda"))
            b = run(model, cache, seq[:, 21:22], 21)
            c = run(model, cache, seq[:, 21:30], 21, tree_mask=tree)
        outs[fuse] = torch.cat([a, b, c], dim=1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.05, atol=0.05)
    torch.testing.assert_close(outs["1"], outs["0"], **tol)
    from pass_ext import model as model_module
    assert model_module.fusion_enabled() is False and set(model_module._compiled) >= {"norm", "add_norm", "rope", "swiglu"}


def test_fused_chain_survives_the_recompile_limit(monkeypatch):
    """A fused chain is compiled once per dtype, each copy with a code object (so a recompile budget) of its
    own; past torch.compile's recompile limit a copy runs eagerly, with a warning, instead of failing the
    forward (a process that runs many shapes, dtypes and models reaches the limit)."""
    import torch._dynamo
    from pass_ext import model as model_module
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    fused = model_module._Fused("swiglu")
    x32, x64 = torch.randn(2, 8), torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x32), model_module._swiglu_chain(x32))
    torch.testing.assert_close(fused(x64), model_module._swiglu_chain(x64))  # another copy: not a recompile
    assert [state for _, state in fused.copies.values()] == ["ok", "ok"]
    x3 = torch.randn(2, 3, 8)  # another rank: the float32 copy must recompile, past the limit of 1
    with pytest.warns(RuntimeWarning, match="running it eagerly"):
        torch.testing.assert_close(fused(x3), model_module._swiglu_chain(x3))
    assert fused.copies[torch.float32][1] == "eager" and fused.copies[torch.float64][1] == "ok"
    torch.testing.assert_close(fused(x3), model_module._swiglu_chain(x3))  # eager from now on, no new warning


def test_norm_chains_compile_once_per_hidden_size(monkeypatch):
    """The norm chains take a weight, whose shape torch.compile keeps static: models of other hidden sizes in one
    process get compiled copies of their own instead of spending one copy's recompile budget (a benchmark that
    ran three models in one process fell back to the eager norms for the third)."""
    import torch._dynamo
    from pass_ext import model as model_module
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    monkeypatch.setattr(model_module, "_compiled", {})
    norm = model_module._chain("norm", True)
    add_norm = model_module._chain("add_norm", True)
    for d in (8, 16, 24):
        x, y, w = torch.randn(3, d), torch.randn(3, d), torch.rand(d) + 0.5
        torch.testing.assert_close(norm(x, w, 1e-6), model_module._rms_norm(x, w, 1e-6))
        for got, want in zip(add_norm(x, y, w, 1e-6), model_module._add_norm_chain(x, y, w, 1e-6)):
            torch.testing.assert_close(got, want)
    for chain in (norm, add_norm):
        assert {key: state for key, (_, state) in chain.copies.items()} == {
            (torch.float32, 8): "ok", (torch.float32, 16): "ok", (torch.float32, 24): "ok"}
