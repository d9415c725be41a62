"""bench/bench_tree.py end to end on the CPU with the real SmolLM2 (a smoke run of every row kind), and the
near-tie measure it shares with bench_generate."""
import json

import pytest
import torch

from bench_scripts import load_bench
from pass_ext import registry


@pytest.fixture(scope="module")
def fetched():
    return registry.fetch("smollm2-135m")


def test_bench_tree_rows_json_and_plot(fetched, tmp_path, capsys):
    bt = load_bench("bench_tree")
    out = tmp_path / "tree.json"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"code": ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n"]}))
    res = bt.main(["--model", "smollm2-135m", "--device", "cpu", "--trees", "1:2,2:3", "--batches", "2",
                   "--settings", "greedy,T0.8/top-k10", "--prompts", "2", "--new", "4", "--repeats", "1",
                   "--prompts-file", str(prompts), "--out", str(out)])
    configs = ["ar", "pass k=4", "pass auto", "tree auto", "tree k=1 n=2 (6 rows)", "tree k=2 n=3 (12 rows)"]
    assert [r["config"] for r in res["rows"]] == configs * 2
    for r in res["rows"]:
        assert r["tokens"] == 2 * 4 and r["decode_tokens_per_s"] > 0 and r["tokens_per_forward"] >= 1.0
        if r["setting"] == "greedy":  # float32 on the CPU: every method gives ar's tokens
            assert r["rows_differing_from_ar"] == 0 and r["near_ties"] == 0
    assert json.loads(out.read_text())["meta"]["model"] == "smollm2-135m"
    assert (tmp_path / "tree.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "tree k=2 n=3" in printed and "picks " in printed
    saved = json.loads(out.read_text())["auto"]   # what auto decided from
    assert any(c["method"] == "pass-tree" and len(c["option"]) == 2 for c in saved["step_costs"])
    assert all(c["seconds"] > 0 for c in saved["step_costs"])
    auto = [r for r in res["rows"] if r["config"] == "tree auto"]
    assert all(len(r["trees"]) == len(r["k"]) for r in auto)   # what auto ran, call by call


def test_divergence_ulps_measures_the_first_difference(fetched):
    """At the first differing position, the distance of the two tokens' logits after the common prefix, in ulps of
    the model's dtype at their magnitude; rows where one is a prefix of the other are not divergences."""
    import math

    import pass_ext
    bg = load_bench("bench_generate")
    model = pass_ext.load_model("smollm2-135m", device="cpu")
    prompt = model.tokenizer("def add(a, b):")["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None],
                       model.new_cache(1, len(prompt)))[0, -1].float()
    top = logits.topk(2).indices.tolist()
    worst = int(logits.argmin())

    def ulps(a, b):
        x, y = logits[a].item(), logits[b].item()
        return abs(x - y) / (2.0 ** (math.frexp(max(abs(x), abs(y)))[1] - 1) * torch.finfo(torch.float32).eps)

    got = bg.divergence_ulps(model, [prompt, prompt, prompt], [[top[1], 9], [worst], [top[0]]],
                             [[top[0], 9], [top[0]], [top[0], 4]])
    assert got == pytest.approx([ulps(top[0], top[1]), ulps(top[0], worst)], rel=1e-4)
    assert got[1] > got[0] > 0
