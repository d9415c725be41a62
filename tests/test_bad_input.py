"""Bad input at every public entry point: each case checks the exception type and that the message names the
argument and what is allowed. Cases already covered next to their feature (test_engine, test_attention,
test_sample, test_speculative_verify, test_loading, test_train) are not repeated here."""
from __future__ import annotations

import math
import os

import pytest
import torch

import pass_ext
from pass_ext import ops
from pass_ext.__main__ import main
from pass_ext.lookahead import FORMAT, LookaheadEmbeddings
from sampling_reference import HAS_CUDA, params, rng
from test_engine import tiny_peaky_llama

P = torch.ops.pass_ext


@pytest.fixture(scope="module")
def model():
    """A tiny float32 model (vocab 16, no tokenizer) with 3 untrained look-ahead embeddings."""
    m = pass_ext.load_model(tiny_peaky_llama(seed=21), dtype=torch.float32, device="cpu")
    m.lookahead = LookaheadEmbeddings.init(m, 3, seed=0)
    return m


# ---- pass_ext.generate ----------------------------------------------------------------------------------------
GENERATE_CASES = {
    # wrong types
    "ids_float_tensor": (dict(ids=torch.zeros(1, 3)), ValueError, r"ids must be a LongTensor \[B, T\]"),
    "ids_3d_tensor": (dict(ids=torch.zeros(1, 1, 3, dtype=torch.long)), ValueError, r"ids must be a LongTensor"),
    "ids_none": (dict(ids=None), TypeError, r"ids must be .*list of token-id lists"),
    "ids_float_tokens": (dict(ids=[[2.0, 3.0]]), TypeError, r"ids row 0 .*token ids must be ints in \[0, 16\)"),
    "ids_bool_token": (dict(ids=[[True, 3]]), TypeError, r"ids row 0 .*token ids must be ints"),
    "ids_nested_too_deep": (dict(ids=[[[2]]]), TypeError, r"ids row 0 .*token ids must be ints"),
    "model_int": (dict(model=42), TypeError, r"model must be a pass_ext.Model, a transformers PreTrainedModel"),
    "model_none": (dict(model=None), TypeError, r"model must be .*short model name"),
    "draft_model_int": (dict(method="draft", draft_model=3.5), TypeError, r"draft_model must be a pass_ext.Model"),
    "max_new_tokens_str": (dict(max_new_tokens="5"), TypeError, r"max_new_tokens must be an int >= 1"),
    "max_new_tokens_float": (dict(max_new_tokens=4.0), TypeError, r"max_new_tokens must be an int >= 1"),
    "max_new_tokens_bool": (dict(max_new_tokens=True), TypeError, r"max_new_tokens must be an int >= 1"),
    "max_new_tokens_negative": (dict(max_new_tokens=-3), ValueError, r"max_new_tokens must be an int >= 1"),
    "method_none": (dict(method=None), ValueError, r"method must be one of ar, pass, pass-paper, pass-tree, draft"),
    # empty prompts and batches
    "batch_zero_tensor": (dict(ids=torch.zeros(0, 3, dtype=torch.long)), ValueError, r"ids .*batch of zero"),
    "empty_prompt_tensor": (dict(ids=torch.zeros(1, 0, dtype=torch.long)), ValueError,
                            r"ids row 0 is empty.*at least one token"),
    "ids_out_of_vocab_tensor": (dict(ids=torch.tensor([[2, 16]])), ValueError, r"ids row 0 .*16.*\[0, 16\)"),
    # sampling parameters
    "temperature_inf": (dict(temperature=math.inf), ValueError, r"temperature must be a finite number >= 0"),
    "temperature_neg_inf": (dict(temperature=-math.inf), ValueError, r"temperature must be a finite number >= 0"),
    "temperature_nan_in_row": (dict(ids=[[2], [3]], temperature=[1.0, math.nan]), ValueError,
                               r"temperature must be a finite number >= 0"),
    "temperature_str": (dict(temperature="hot"), TypeError, r"temperature must be a number"),
    "top_p_nan": (dict(top_p=math.nan), ValueError, r"top_p must be in \(0, 1\]"),
    "top_p_negative": (dict(top_p=-0.5), ValueError, r"top_p must be in \(0, 1\]"),
    "top_p_inf": (dict(top_p=math.inf), ValueError, r"top_p must be in \(0, 1\]"),
    "top_k_float": (dict(top_k=1.5), TypeError, r"top_k must be an int"),
    "top_k_negative_row": (dict(ids=[[2], [3]], top_k=[0, -1]), ValueError, r"top_k must be >= 0"),
    # look-ahead
    "lookahead_float": (dict(lookahead=2.5), TypeError, r"lookahead must be an int in 1\.\.16"),
    "lookahead_str": (dict(lookahead="2"), TypeError, r"lookahead must be an int in 1\.\.16"),
    "lookahead_bool": (dict(lookahead=True), TypeError, r"lookahead must be an int in 1\.\.16"),
    "lookahead_zero": (dict(lookahead=0), ValueError, r"lookahead must be an int in 1\.\.16"),
    "lookahead_over_loaded": (dict(lookahead=4), ValueError, r"lookahead=4 exceeds the 3 .*allowed: 1\.\.3"),
    "lookahead_over_loaded_paper": (dict(method="pass-paper", lookahead=5), ValueError, r"allowed: 1\.\.3"),
    "lookahead_draft_too_many": (dict(method="draft", lookahead=17, draft_model="self"), ValueError,
                                 r"lookahead must be an int in 1\.\.16"),
    # capacity
    "max_length_too_small_fused": (dict(max_length=10), ValueError, r"max_length=10 .*need max_length >= 18"),
    "max_length_negative": (dict(max_length=-1), ValueError, r"max_length=-1 .*need max_length >="),
    "max_length_float": (dict(max_length=64.0), TypeError, r"max_length must be an int"),
    # the rest of the request
    "seed_str": (dict(seed="x", temperature=1.0), TypeError, r"seed must be an int"),
    "seed_too_big": (dict(seed=2 ** 64), ValueError, r"seed must be an int in \["),
    "pad_token_id_str": (dict(pad_token_id="x"), TypeError, r"pad_token_id must be an int"),
    "pad_token_id_negative": (dict(pad_token_id=-1), ValueError, r"pad_token_id must be an int in \[0, "),
    "prefill_chunk_zero": (dict(prefill_chunk=0), ValueError, r"prefill_chunk must be an int in \[1, "),
    "prefill_chunk_negative": (dict(prefill_chunk=-1), ValueError, r"prefill_chunk must be an int in \[1, "),
    "sync_every_zero": (dict(sync_every=0), ValueError, r"sync_every must be an int >= 1"),
    "eos_out_of_vocab": (dict(eos_token_id=[2, 99]), ValueError, r"eos_token_id 99 .*\[0, 16\)"),
    "draft_model_with_pass": (dict(draft_model="self"), ValueError, r"draft_model is only used by method='draft'"),
    "streamer_with_batch": (dict(ids=[[2], [3]], stream=type("S", (), {"put": None, "end": None})()), ValueError,
                            r"streamer \(put/end\) takes a batch of one"),
}


@pytest.mark.parametrize("case", sorted(GENERATE_CASES))
def test_generate_rejects(model, case):
    kwargs, exc, pattern = GENERATE_CASES[case]
    kwargs = dict(kwargs)
    target = kwargs.pop("model", model)
    ids = kwargs.pop("ids", [[2, 3, 4]])
    if kwargs.get("draft_model") == "self":
        kwargs["draft_model"] = model
    kwargs.setdefault("max_new_tokens", 2)
    with pytest.raises(exc, match=pattern):
        pass_ext.generate(target, ids, **kwargs)


def test_generate_accepts_the_edges(model):
    """The limits themselves are allowed: top_p = 1, top_k = 0, temperature 0, lookahead = loaded k, the
    smallest max_length, a one-token prompt."""
    out = pass_ext.generate(model, [[2]], lookahead=3, top_p=1.0, top_k=0, temperature=0.0, max_new_tokens=3,
                            max_length=16, eos_token_id=False, prefill_chunk=1)
    assert out.num_new_tokens[0] >= 1
    out = pass_ext.generate(model, [[2, 3]], method="ar", top_p=1e-6, temperature=1e-3, seed=-5,
                            max_new_tokens=2, eos_token_id=False)
    assert out.num_new_tokens[0] == 2


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
def test_generate_draft_on_another_device(model):
    other = pass_ext.load_model(tiny_peaky_llama(seed=21), dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match=r"draft_model is on cuda"):
        pass_ext.generate(model, [[2, 3]], method="draft", draft_model=other)


# ---- pass_ext.load_model ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("source, exc, pattern", [
    (42, TypeError, r"source must be a transformers PreTrainedModel, a path .* or a short model name"),
    (None, TypeError, r"source must be .*smollm2-135m"),
    (torch.nn.Linear(2, 2), TypeError, r"expected a transformers PreTrainedModel, got Linear"),
])
def test_load_model_wrong_type(source, exc, pattern):
    with pytest.raises(exc, match=pattern):
        pass_ext.load_model(source)


def test_load_model_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.gguf"):
        pass_ext.load_model(str(tmp_path / "sub" / "model.gguf"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        pass_ext.load_model(tmp_path)


@pytest.mark.parametrize("what", ["random", "bad_magic", "huge_key", "version_1", "no_tensors", "missing_weights"])
def test_load_model_corrupt_gguf(tmp_path, what):
    path = tmp_path / f"{what}.gguf"
    header = b"GGUF" + (3).to_bytes(4, "little")
    if what == "random":
        path.write_bytes(os.urandom(2048))
    elif what == "bad_magic":
        path.write_bytes(b"GGUG" + bytes(100))
    elif what == "huge_key":  # one metadata entry whose key claims a terabyte
        path.write_bytes(header + (1).to_bytes(8, "little") + (1).to_bytes(8, "little") + (1 << 40).to_bytes(8, "little"))
    elif what == "version_1":
        path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(16))
    else:
        import gguf
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_block_count(1)
        if what == "missing_weights":
            writer.add_tensor("token_embd.weight", torch.zeros(8, 4).numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    pattern = {"version_1": r"version 1 is not supported \(need 2 or later\)", "no_tensors": "holds no tensors",
               "missing_weights": r"lacks \d+ weights the llama architecture needs"}.get(what, "not a valid GGUF")
    with pytest.raises(ValueError, match=pattern) as info:
        pass_ext.load_model(path)
    assert path.name in str(info.value)


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=32,
                                      bos_token_id=0, eos_token_id=1)).eval()


def test_load_model_unsupported_arch(gpt2, tmp_path):
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*supported: llama, mistral, qwen2"):
        pass_ext.load_model(gpt2)
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2' in .*config.json; supported: llama"):
        pass_ext.load_model(tmp_path)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(dtype="float32"), TypeError, r"dtype must be a floating torch.dtype"),
    (dict(dtype=torch.int64), TypeError, r"dtype must be a floating torch.dtype"),
    (dict(device="gpu"), ValueError, r"device must be 'cpu', 'cuda' or 'cuda:N'"),
])
def test_load_model_bad_dtype_and_device(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        pass_ext.load_model(tiny_peaky_llama(seed=2), **kwargs)


# ---- pass_ext.train_lookahead -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_data():
    return [list(range(2, 16)) * 3 for _ in range(4)]  # 4 sequences of 42 tokens


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(k=17), ValueError, r"k must be an int in 1\.\.16, got 17"),
    (dict(k=2.0), ValueError, r"k must be an int in 1\.\.16"),
    (dict(k=-1), ValueError, r"k must be an int in 1\.\.16"),
    (dict(objective=None), ValueError, r"objective must be one of \('kl', 'ce'\)"),
    (dict(data=[]), ValueError, r"data is empty"),
    (dict(data=None), TypeError, r"data must be a list of texts or of token-id sequences"),
    (dict(data=5), TypeError, r"data must be a list of texts or of token-id sequences, got int"),
    (dict(data="some text"), TypeError, r"data must be a list of texts or of token-id sequences, got str"),
    (dict(data=["some text", "more"]), ValueError, r"data holds texts but the model has no tokenizer"),
    (dict(data=[[99] * 20]), ValueError, r"data holds token id 99: token ids must be ints in \[0, 16\)"),
    (dict(eval_data=[["x"] * 20]), ValueError, r"eval_data holds token id 'x'"),
    (dict(steps=0), ValueError, r"steps must be an int >= 1"),
    (dict(batch_size=0), ValueError, r"batch_size must be an int >= 1"),
    (dict(cut_stride=0), ValueError, r"cut_stride must be an int >= 1"),
    (dict(eval_every=0), ValueError, r"eval_every must be an int >= 1"),
    (dict(seq_len=12.5), TypeError, r"seq_len must be an int >= 1"),
    (dict(seq_len=4), ValueError, r"seq_len must be at least k \+ 3 = 5"),
])
def test_train_lookahead_rejects(model, train_data, kwargs, exc, pattern):
    kwargs = {"data": train_data, "k": 2, "steps": 1, "seq_len": 12, "progress": False, **kwargs}
    data = kwargs.pop("data")
    with pytest.raises(exc, match=pattern):
        pass_ext.train_lookahead(model, data, **kwargs)


def test_train_lookahead_takes_a_tensor_of_sequences(model, train_data):
    la = pass_ext.train_lookahead(model, torch.tensor(train_data), k=2, steps=1, seq_len=12, progress=False)
    assert la.k == 2


# ---- LookaheadEmbeddings.load -----------------------------------------------------------------------------------
def _write(path, weight, **meta):
    from safetensors.torch import save_file
    save_file({"lookahead": weight}, str(path), metadata=meta)
    return path


def test_lookahead_load_missing_and_wrong_type(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"look-ahead file not found: .*nope.safetensors"):
        LookaheadEmbeddings.load(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match="look-ahead file not found"):
        LookaheadEmbeddings.load(tmp_path)  # a directory
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike"):
        LookaheadEmbeddings.load(5)
    good = tmp_path / "good.safetensors"
    LookaheadEmbeddings.init(model, 2).save(str(good))
    assert LookaheadEmbeddings.load(good).k == 2  # a Path is fine
    with pytest.raises(TypeError, match=r"model must be a pass_ext.Model \(or None\), got str"):
        LookaheadEmbeddings.load(good, model="x")


def test_lookahead_load_corrupt(model, tmp_path):
    d = model.config.hidden_size
    fp = model.fingerprint
    good = tmp_path / "good.safetensors"
    LookaheadEmbeddings.init(model, 3).save(str(good))
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) - 16])
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(b"\xff" * 8 + raw[8:])  # header length out of range
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    cases = [
        (truncated, "not a pass_ext look-ahead file"),
        (flipped, "not a pass_ext look-ahead file"),
        (other, "not a pass_ext look-ahead file"),
        (_write(tmp_path / "nofmt.safetensors", torch.zeros(2, d), fingerprint=fp), r"format=None, expected"),
        (_write(tmp_path / "nofp.safetensors", torch.zeros(2, d), format=FORMAT), "no model fingerprint"),
        (_write(tmp_path / "badjson.safetensors", torch.zeros(2, d), format=FORMAT, fingerprint=fp, meta="{x"),
         "'meta' entry is not JSON"),
        (_write(tmp_path / "nan.safetensors", torch.full((2, d), math.nan), format=FORMAT, fingerprint=fp),
         "not finite"),
        (_write(tmp_path / "int.safetensors", torch.zeros(2, d, dtype=torch.int32), format=FORMAT, fingerprint=fp),
         "not finite floating-point"),
        (_write(tmp_path / "1d.safetensors", torch.zeros(d), format=FORMAT, fingerprint=fp),
         r"look-ahead weight must be \[k >= 1, d_model\]"),
    ]
    for path, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            LookaheadEmbeddings.load(path)


def test_lookahead_load_other_models_embeddings(model, tmp_path):
    other = pass_ext.load_model(tiny_peaky_llama(seed=22, hidden=48, heads=4, kv_heads=2), dtype=torch.float32,
                                device="cpu")
    path = tmp_path / "other.safetensors"
    LookaheadEmbeddings.init(other, 2).save(str(path))
    with pytest.raises(ValueError, match=rf"fingerprint {other.fingerprint}.*this model's fingerprint is "
                                         rf"{model.fingerprint}.*train"):
        LookaheadEmbeddings.load(path, model)
    # Same fingerprint claimed, wrong width: the d_model check still refuses it.
    forged = _write(tmp_path / "forged.safetensors", torch.zeros(2, 48), format=FORMAT, fingerprint=model.fingerprint)
    with pytest.raises(ValueError, match=r"d_model=48, the model has hidden_size=32"):
        LookaheadEmbeddings.load(forged, model)


# ---- the ops, called raw ----------------------------------------------------------------------------------------
def _attention_args(B=2, Q=3, Hq=4, Hkv=2, D=8, S=16, lens=(1, 2), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q = rnd(B, Q, Hq, D)
    return dict(q=q, k_new=rnd(B, Q, Hkv, D), v_new=rnd(B, Q, Hkv, D), k_cache=rnd(B, Hkv, S, D),
                v_cache=rnd(B, Hkv, S, D), cache_lens=torch.tensor(lens, dtype=torch.int32), tree_mask=None,
                scale=0.3, out=torch.empty_like(q))


def _noncontig(t):
    """The same values, every stride doubled on the last dim: not contiguous."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)[..., ::2]
    big.copy_(t)
    assert not big.is_contiguous()
    return big


ATTENTION_CASES = {
    "batch_zero": (dict(B=0, lens=()), None, r"q must be \[B, Q, Hq, D\] with every size >= 1"),
    "no_new_tokens": (dict(Q=0), None, r"q must be \[B, Q, Hq, D\] with every size >= 1"),
    "head_dim_zero": (dict(D=0), None, r"q must be \[B, Q, Hq, D\] with every size >= 1"),
    "int_q": (dict(dtype=torch.int64), None, r"q must be float32, float64, bfloat16 or float16, got Long"),
    "scale_nan": ({}, lambda a: a.update(scale=math.nan), r"scale must be a finite number, got nan"),
    "scale_inf": ({}, lambda a: a.update(scale=math.inf), r"scale must be a finite number"),
    "q_5d": ({}, lambda a: a.update(q=a["q"][None]), r"q must be \[B, Q, Hq, D\]"),
    "k_new_3d": ({}, lambda a: a.update(k_new=a["k_new"][0]), r"k_new must be \[B, Q, Hkv, D\]"),
    "k_cache_head_dim": ({}, lambda a: a.update(k_cache=a["k_cache"][..., :4].contiguous()),
                         r"k_cache must be \[B=2, Hkv=2, S_max, D=8\]"),
    "cache_lens_2d": ({}, lambda a: a.update(cache_lens=a["cache_lens"][None]), r"cache_lens must be \[B=2\]"),
    "out_dtype": ({}, lambda a: a.update(out=a["out"].double()), r"out must have q's dtype"),
    "v_new_shape": ({}, lambda a: a.update(v_new=a["v_new"][:, :2]), r"v_new must match k_new"),
    "negative_length": ({}, lambda a: a.update(cache_lens=torch.tensor([-1, 0], dtype=torch.int32)),
                        r"cache_lens\[0\] = -1 .*S_max = 16"),
    "zero_capacity": (dict(S=0, lens=(0, 0)), None, r"cache_lens\[0\] = 0 plus Q = 3 .*S_max = 0"),
}
for _name in ("k_cache", "v_cache", "out"):  # q / k_new / v_new may be views (test_attention.py)
    ATTENTION_CASES[f"{_name}_noncontiguous"] = (
        {}, lambda a, n=_name: a.update({n: _noncontig(a[n])}), rf"{_name} must be contiguous")
ATTENTION_CASES["cache_lens_noncontiguous"] = (
    {}, lambda a: a.update(cache_lens=torch.tensor([1, 0, 2, 0], dtype=torch.int32)[::2]),
    r"cache_lens must be contiguous")
ATTENTION_CASES["tree_mask_noncontiguous"] = (
    dict(Q=65, S=80), lambda a: a.update(tree_mask=torch.zeros(2, 65, dtype=torch.long).t()),
    r"tree_mask must be contiguous")


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_op_rejects(case):
    shape, mutate, pattern = ATTENTION_CASES[case]
    args = _attention_args(**shape)
    if mutate is not None:
        mutate(args)
    caches = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(RuntimeError, match=pattern):
        P.attention_with_kv_cache(*args.values())
    assert torch.equal(args["k_cache"], caches[0]) and torch.equal(args["v_cache"], caches[1]), \
        "a refused call must not write the caches"


def test_attention_wrapper_makes_read_only_inputs_contiguous():
    """The raw op refuses non-contiguous inputs; the wrapper copies the read-only ones and gets the same result."""
    args = _attention_args()
    ref_args = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    P.attention_with_kv_cache(*ref_args.values())
    out = ops.attention_with_kv_cache(_noncontig(args["q"]), _noncontig(args["k_new"]), _noncontig(args["v_new"]),
                                      args["k_cache"], args["v_cache"],
                                      torch.tensor([1, 0, 2, 0], dtype=torch.int32)[::2], None, 0.3)
    assert out.is_contiguous()
    assert torch.equal(out, ref_args["out"]) and torch.equal(args["k_cache"], ref_args["k_cache"])


@pytest.mark.parametrize("Q", [1, 4])
def test_attention_guard_slots_never_written(Q):
    """Caches are views into a bigger buffer with guard rows before and after (the op needs contiguous caches:
    a slice along the first dim is one). In-range calls write only their slots; an over-capacity call is
    refused and leaves every byte of the buffer unchanged; nothing at or past S_max is ever written."""
    B, Hkv, S, D, guard = 3, 2, 12, 8, 7.0
    for lens in ([0, 5, S - Q], [1, S - Q + 1, 2], [S, 0, 0], [0, 0, -1]):
        big_k = torch.full((B + 2, Hkv, S, D), guard)
        big_v = torch.full((B + 2, Hkv, S, D), guard)
        k_cache, v_cache = big_k[1:-1], big_v[1:-1]
        assert k_cache.is_contiguous()
        a = _attention_args(B=B, Q=Q, Hq=4, Hkv=Hkv, D=D, S=S, lens=[0] * B)
        cache_lens = torch.tensor(lens, dtype=torch.int32)
        before = (big_k.clone(), big_v.clone())
        fits = all(0 <= n and n + Q <= S for n in lens)
        if fits:
            P.attention_with_kv_cache(a["q"], a["k_new"], a["v_new"], k_cache, v_cache, cache_lens, None, 0.3,
                                      a["out"])
            expected_k, expected_v = before[0].clone(), before[1].clone()
            for b, n in enumerate(lens):
                expected_k[b + 1, :, n:n + Q] = a["k_new"][b].transpose(0, 1)
                expected_v[b + 1, :, n:n + Q] = a["v_new"][b].transpose(0, 1)
            assert torch.equal(big_k, expected_k) and torch.equal(big_v, expected_v)
        else:
            with pytest.raises(RuntimeError, match=r"cache_lens\[\d\] = .*exceeds the cache capacity"):
                P.attention_with_kv_cache(a["q"], a["k_new"], a["v_new"], k_cache, v_cache, cache_lens, None, 0.3,
                                          a["out"])
            assert torch.equal(big_k, before[0]) and torch.equal(big_v, before[1])
        assert (big_k[0] == guard).all() and (big_k[-1] == guard).all()


def _sample_args(N=3, V=5):
    temperature, top_k, top_p = params(N, 1.0, 0, 1.0, "cpu")
    s, o = rng(1, 0, "cpu")
    return dict(logits=torch.randn(N, V), temperature=temperature, top_k=top_k, top_p=top_p, seed=s, offset=o,
                out=torch.empty(N, dtype=torch.long), probs_out=None)


def _verify_args(B=2, k=2, V=5):
    temperature, top_k, top_p = params(B, 1.0, 0, 1.0, "cpu")
    s, o = rng(1, 0, "cpu")
    return dict(target_logits=torch.randn(B, k + 1, V), draft_tokens=torch.randint(0, V, (B, k)),
                draft_probs=torch.softmax(torch.randn(B, k, V), -1), temperature=temperature, top_k=top_k,
                top_p=top_p, seed=s, offset=o, out_tokens=torch.empty(B, k + 1, dtype=torch.long),
                accepted=torch.empty(B, dtype=torch.int32))


def test_sample_op_rejects():
    cases = [
        (dict(N=0), {}, r"logits must hold at least one row N >= 1"),
        ({}, dict(logits=torch.randint(0, 3, (3, 5))), r"logits must be float32, bfloat16 or float16, got Long"),
        (dict(V=(1 << 20) + 1), {}, r"logits must have a vocabulary size V in \[1, 2\^20\]"),
        ({}, dict(temperature=torch.ones(6)[::2]), "temperature must be contiguous"),
        ({}, dict(top_k=torch.zeros(6, dtype=torch.int32)[::2]), "top_k must be contiguous"),
        ({}, dict(top_p=torch.ones(6)[::2]), "top_p must be contiguous"),
        ({}, dict(out=torch.empty(6, dtype=torch.long)[::2]), "out must be contiguous"),
        ({}, dict(probs_out=torch.empty(5, 3).t()), "probs_out must be contiguous"),
    ]
    for shape, override, pattern in cases:
        args = dict(_sample_args(**shape), **override)
        with pytest.raises(RuntimeError, match=pattern):
            P.sample(*args.values())


def test_verify_op_rejects():
    cases = [
        (dict(B=0), {}, r"target_logits must hold at least one row B >= 1"),
        (dict(k=256), {}, r"target_logits must have k\+1 in \[1, 256\] positions, got 257"),
        ({}, dict(target_logits=torch.randn(2, 5, 3).transpose(1, 2)), "target_logits must be contiguous"),
        ({}, dict(draft_tokens=torch.randint(0, 5, (2, 4))[:, ::2]), "draft_tokens must be contiguous"),
        ({}, dict(draft_probs=torch.rand(2, 5, 2).transpose(1, 2)), "draft_probs must be contiguous"),
        ({}, dict(out_tokens=torch.empty(2, 6, dtype=torch.long)[:, ::2]), "out_tokens must be contiguous"),
        ({}, dict(seed=torch.tensor([1.0])), "seed must be a one-element int64 tensor"),
    ]
    for shape, override, pattern in cases:
        args = dict(_verify_args(**shape), **override)
        with pytest.raises(RuntimeError, match=pattern):
            P.speculative_verify(*args.values())
    P.speculative_verify(*_verify_args(k=255).values())  # the largest k is allowed


def test_sample_non_finite_logits_give_in_range_tokens():
    """NaN counts as -inf; a row with no finite logit (all NaN, all -inf, NaN and -inf) returns token 0 with
    probs_out one-hot at 0; +inf logits share the mass equally, so the token is one of them."""
    V = 6
    logits = torch.tensor([[math.nan] * V, [-math.inf] * V, [math.nan, -math.inf] * 3, [math.inf] * V,
                           [1.0, math.inf, math.nan, -math.inf, math.inf, 0.0], [math.nan, 2.0, 1, 0, 0, 0]])
    N = logits.shape[0]
    for temperature in (0.0, 1.0, math.nan, math.inf):
        for top_k, top_p in ((0, 1.0), (2, 0.5)):
            args = _sample_args(N=N, V=V)
            args.update(logits=logits, temperature=torch.full((N,), temperature), top_k=torch.full(
                (N,), top_k, dtype=torch.int32), top_p=torch.full((N,), top_p), probs_out=torch.empty(N, V))
            P.sample(*args.values())
            out, probs = args["out"], args["probs_out"]
            assert ((out >= 0) & (out < V)).all()
            assert out[:3].tolist() == [0, 0, 0] and (probs[:3, 0] == 1).all()
            assert torch.isfinite(probs).all() and (probs >= 0).all()
            torch.testing.assert_close(probs.sum(1), torch.ones(N))
            assert out[4] in (1, 4) and probs[4, [0, 2, 3, 5]].sum() == 0
            assert out[5] == 1 or temperature == 1.0 or temperature == math.inf


def test_verify_garbage_inputs_keep_the_structure():
    """Non-finite target logits and draft_probs that are not distributions (NaN, negative, all zero): no crash,
    every emitted token in [0, V), the accepted prefix equal to the drafts, -1 after the stop."""
    B, k, V = 4, 3, 7
    for logits_fill in (math.nan, math.inf, -math.inf, None):
        for probs_fill in (math.nan, -1.0, 0.0, None):
            args = _verify_args(B=B, k=k, V=V)
            if logits_fill is not None:
                args["target_logits"][1:] = logits_fill
            if probs_fill is not None:
                args["draft_probs"][::2] = probs_fill
            args["temperature"][0] = 0.0
            P.speculative_verify(*args.values())
            out, acc, drafts = args["out_tokens"], args["accepted"], args["draft_tokens"]
            assert ((acc >= 0) & (acc <= k)).all()
            for b in range(B):
                a = int(acc[b])
                assert torch.equal(out[b, :a], drafts[b, :a])
                assert 0 <= out[b, a] < V
                assert (out[b, a + 1:] == -1).all()


# ---- the CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    tiny_peaky_llama(seed=23).save_pretrained(path)
    return path


@pytest.mark.parametrize("argv, words", [
    (["--method", "beam"], ["--method", "invalid choice", "'beam'", "ar", "pass-paper", "draft"]),
    (["--top-p", "abc"], ["--top-p", "invalid float value"]),
    (["--max-new-tokens", "2.5"], ["--max-new-tokens", "invalid int value"]),
    (["--dtype", "int8"], ["--dtype", "invalid choice", "bfloat16"]),
    (["--lookahead", "0"], ["--lookahead", "integer k >= 1 or 'auto'", "'0'"]),
    (["--lookahead", "fast"], ["--lookahead", "integer k >= 1 or 'auto'", "'fast'"]),
])
def test_cli_argparse_errors(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "hi", *argv])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "error:" in err
    for w in words:
        assert w in err


def test_cli_missing_prompt_and_verb(capsys):
    for argv in (["generate"], [], ["decode"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code != 0
    assert "error:" in capsys.readouterr().err


def test_cli_missing_model_path(capsys, tmp_path):
    rc = main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope" / "m.gguf")])
    err = capsys.readouterr().err
    assert rc != 0 and "error:" in err and "m.gguf" in err


@pytest.mark.parametrize("argv, words", [
    (["--top-p", "1.5"], ["error:", "top_p must be in (0, 1]"]),
    (["--top-p", "0"], ["error:", "top_p must be in (0, 1]"]),
    (["--temperature", "-1"], ["error:", "temperature must be a finite number >= 0"]),
    (["--top-k", "-3"], ["error:", "top_k must be >= 0"]),
    (["--max-new-tokens", "0"], ["error:", "max_new_tokens must be an int >= 1"]),
    (["--method", "draft"], ["error:", "draft_model"]),
])
def test_cli_generate_value_errors(capsys, tiny_dir, monkeypatch, argv, words):
    """A tiny HF dir without tokenizer files: the CLI needs one to encode the prompt, so one made of single
    characters stands in (the model's vocabulary has 16 ids)."""
    import pass_ext.model

    class CharTokenizer:
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [2 + ord(c) % 14 for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(97 + i) for i in ids)

    monkeypatch.setattr(pass_ext.model.Model, "tokenizer", property(lambda self: CharTokenizer()))
    rc = main(["generate", "--prompt", "hi", "--model", str(tiny_dir), "--method", "ar", "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc != 0
    for w in words:
        assert w in err
