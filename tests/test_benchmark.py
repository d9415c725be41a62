"""pass_ext.benchmark and `python -m pass_ext bench`: every method on the same prompts, timed, with the speed-up
over plain decoding and the check that greedy tokens equal plain decoding's."""
import json

import pytest
import torch

import pass_ext
import pass_ext.__main__ as cli
from pass_ext import registry
from pass_ext.benchmark import compare_methods, format_rows
from pass_ext.lookahead import LookaheadEmbeddings


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=0, eos_token_id=1)).eval()
    model = pass_ext.load_model(hf, dtype=torch.float32, device="cpu")
    model.lookahead = LookaheadEmbeddings.init(model, 3, seed=1)
    draft = pass_ext.load_model(hf, dtype=torch.float32, device="cpu")  # the same model: every draft is accepted
    return model, draft


def test_compare_methods_rows(tiny):
    model, draft = tiny
    prompts = [[2, 5, 7, 9], [3, 4]]
    methods = ["ar", "pass", "pass-paper", "pass-auto", "pass-tree", "pass-tree-auto", "draft"]
    rows = compare_methods(model, prompts, methods, max_new_tokens=6, repeats=2, draft_model=draft, progress=False)
    by = {r["method"]: r for r in rows}
    assert list(by) == methods
    assert by["ar"]["k"] == 0 and by["ar"]["speedup"] == 1.0 and by["ar"]["tokens_per_forward"] == 1.0
    assert by["pass"]["k"] == 3 and by["draft"]["k"] == 4
    assert by["pass-tree"]["k"] == 1 and by["pass-tree"]["draft_tree"] and by["pass"]["draft_tree"] is None
    auto = by["pass-tree-auto"]   # a tree, or plain decoding (k = 0, no tree)
    assert (auto["k"] == 0) == (auto["draft_tree"] is None)
    for r in rows:  # float32 greedy: every method is lossless
        assert r["same_tokens_as_ar"] is True, r
        assert r["tokens_per_s"] > 0 and r["decode_tokens_per_s"] >= r["tokens_per_s"] and r["speedup"] > 0
    assert by["draft"]["tokens_per_forward"] > 2  # the draft is the target itself
    text = format_rows(rows)
    assert text.splitlines()[0].split()[:2] == ["method", "k"] and len(text.splitlines()) == 1 + len(methods)
    assert "tree: 3 nodes" in text


def test_compare_methods_sampled_has_no_equality_check(tiny):
    model, _ = tiny
    rows = compare_methods(model, [[2, 5]], ["ar", "pass"], max_new_tokens=4, repeats=1, temperature=0.8,
                           top_k=5, progress=False)
    assert [r["same_tokens_as_ar"] for r in rows] == [None, None]


def test_compare_methods_errors(tiny):
    model, no_lookahead = tiny
    for kwargs, message in [(dict(methods=["beam"]), "methods must be some of"),
                            (dict(methods=[]), "methods must be some of"),
                            (dict(methods=["draft"]), "method 'draft' needs a draft model"),
                            (dict(methods=["ar"], repeats=0), "repeats and max_new_tokens must be >= 1")]:
        with pytest.raises(ValueError, match=message):
            compare_methods(model, [[2, 3]], progress=False, **kwargs)
    with pytest.raises(ValueError, match="need look-ahead embeddings"):
        compare_methods(no_lookahead, [[2, 3]], ["ar", "pass-auto"], progress=False)


@pytest.fixture(scope="module")
def fetched():
    return registry.fetch("smollm2-135m")


def test_cli_bench(fetched, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc = cli.main(["bench", "--device", "cpu", "--methods", "ar,pass-paper", "--prompt", "def add(a, b):",
                   "--batch", "2", "--max-new-tokens", "4", "--repeats", "1", "--lookahead", "2", "--quiet",
                   "--json", str(out_json)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "2 rows x 4 new tokens, greedy" in out and "same as ar" in out
    data = json.loads(out_json.read_text())
    assert [r["method"] for r in data["results"]] == ["ar", "pass-paper"]
    assert data["results"][1]["same_tokens_as_ar"] is True and data["results"][1]["k"] == 2


@pytest.mark.parametrize("argv,message", [(["--batch", "0"], "--batch must be >= 1"),
                                          (["--methods", "ar,draft"], "method 'draft' needs a draft model"),
                                          (["--methods", "ar,beam"], "methods must be some of"),
                                          (["--repeats", "0"], "--repeats and --max-new-tokens must be >= 1")])
def test_cli_bench_errors(capsys, argv, message):
    """Bad arguments are refused before the model loads."""
    rc = cli.main(["bench", "--model", "no-such-model", "--device", "cpu", "--max-new-tokens", "2", "--quiet",
                   *argv])
    _, err = capsys.readouterr()
    assert rc == 2 and message in err
