"""bench/bench_generate.py on CPU at toy sizes: every row kind is produced (ours, transformers', projections
from random-weight step costs), the JSON has its schema and merges parts, the tables and the plot are made."""
import importlib.util
import json
import math
import os

import pytest
import torch

import pass_ext
from pass_ext.lookahead import LookaheadEmbeddings

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_generate.py")


@pytest.fixture(scope="module")
def bg():
    spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CharTokenizer:
    """Stands in for a real tokenizer: one id per character, inside the toy vocabulary."""
    pad_token_id = None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % (self.vocab - 3) for c in text]}


PROMPTS = {"code": [f"def f{i}(x):\n    return x + {i}\n" for i in range(32)],
           "english": [f"It was the {i}th night of the storm." for i in range(32)]}
ROW_KEYS = {"model", "method", "setting", "batch", "projected", "status", "note", "new_tokens", "k", "tokens_per_s",
            "tokens_per_s_runs", "speedup_vs_ar", "decode_tokens_per_s", "decode_speedup_vs_ar", "tokens_per_forward",
            "acceptance_by_position", "step_s", "roofline_pct", "differing_rows", "rows_compared", "near_ties",
            "max_tie_ulps", "tpf_source"}


@pytest.fixture(autouse=True)
def one_thread():
    """Toy matmuls are faster on one thread, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rows_json_and_reports(bg, tiny_hf_model, tmp_path, capsys):
    out = str(tmp_path / "generate.json")
    common = ["--device", "cpu", "--batches", "1,2", "--hf-batches", "1,2", "--new", "12", "--repeats", "1",
              "--random-new", "8", "--random-short", "4", "--prompt-tokens", "24", "--out", out]
    args = bg.parse_args(common + ["--rows", "all"])
    res = bg.empty_results()
    res["prompts"] = PROMPTS
    bench = bg.Bench(args, res)
    hf = tiny_hf_model("llama", seed=0, max_position_embeddings=512)
    hf_draft = tiny_hf_model("llama", seed=1, num_hidden_layers=1, max_position_embeddings=512)
    ours, draft = pass_ext.load_model(hf, device="cpu"), pass_ext.load_model(hf_draft, device="cpu")
    ours.lookahead = LookaheadEmbeddings.init(ours, 4, seed=0)
    bench.measure_real("toy", hf, ours, CharTokenizer(64), hf_draft, draft, draft_name="toy-draft")

    rows = {(r["method"], r["setting"], r["batch"]): r for r in res["rows"]}
    assert bench.settings == ["greedy", "T0.8/top-k10"]  # the default; "T0.8" on request
    for setting in bench.settings:
        for B in (1, 2):
            for method in ("ar", "draft", "pass-paper", "pass", "hf-eager", "hf-static"):
                r = rows[(method, setting, B)]
                assert r["status"] == "ok", r
                assert r["tokens_per_s"] > 0 and r["speedup_vs_ar"] > 0
                if setting == "greedy":  # float32: every method returns ar's tokens
                    assert (r["differing_rows"], r["rows_compared"]) == (0, B), r
            for method in ("hf-pld", "hf-assisted"):  # transformers speculates with batch 1 only
                assert rows[(method, setting, B)]["status"] == ("ok" if B == 1 else "n/a")
            assert rows[("pass-auto", setting, B)]["status"] in ("ok", "n/a")
            ar = rows[("ar", setting, B)]
            assert ar["speedup_vs_ar"] == 1.0 == ar["decode_speedup_vs_ar"] and ar["forward_passes"] == 12
            assert ar["decode_tokens_per_s"] > ar["tokens_per_s"]  # the prefill is out
            assert ar["step_s"] == pytest.approx(B * 12 / ar["decode_tokens_per_s"] / 12) and ar["roofline_pct"] > 0
            assert rows[("pass", setting, B)]["decode_speedup_vs_ar"] > 0
            for method in ("hf-eager", "hf-static"):
                # HF decode time is a long call minus a short one: on a toy model the difference can vanish in
                # timing noise, and the row then says so (None) rather than report a made-up rate.
                speedup = rows[(method, setting, B)]["decode_speedup_vs_ar"]
                assert speedup is None or speedup > 0
            assert rows[("pass", setting, B)]["k"] == 4 and rows[("pass", setting, B)]["tokens_per_forward"] >= 1
            assert rows[("draft", setting, B)]["k"] == 4


def test_random_presets_project_with_real_tokens_per_forward(bg, tiny_hf_model, tmp_path, capsys):
    out = str(tmp_path / "generate.json")
    common = ["--device", "cpu", "--batches", "1,2", "--new", "4", "--repeats", "1", "--random-new", "8",
              "--random-short", "4", "--out", out, "--tiny", "--settings", "greedy"]
    res = bg.empty_results()
    res["prompts"] = PROMPTS
    # A real-model part first (ar and pass only), then the random part merged into the same file.
    bench = bg.Bench(bg.parse_args(common + ["--rows", "ar,pass"]), res)
    hf = tiny_hf_model("llama", seed=0, max_position_embeddings=512)
    ours = pass_ext.load_model(hf, device="cpu")
    ours.lookahead = LookaheadEmbeddings.init(ours, 4, seed=0)
    bench.measure_real("toy", None, ours, CharTokenizer(64))
    bg.save_results(res, out)

    bg.main(common + ["--rows", "ar,draft,pass", "--models", "llama-3.1-8b"])  # merges into the same file
    on_disk = json.load(open(out))
    assert len(on_disk["runs"]) == 1 and on_disk["runs"][0]["device"] == "cpu"
    assert on_disk["schema"] == bg.SCHEMA
    assert set(on_disk) >= {"runs", "models", "prompts", "rows", "step_costs", "ar_tokens", "bandwidth_bytes_per_s"}
    assert on_disk["models"]["toy"]["kind"] == "real"
    assert on_disk["models"]["llama-3.1-8b@tiny"]["kind"] == "random"
    assert on_disk["models"]["llama-3.1-8b@tiny"]["draft"] == "llama-3.2-1b"
    for r in on_disk["rows"]:
        assert ROW_KEYS <= set(r), set(ROW_KEYS) - set(r)
    costs = {(s["method"], s["batch"], s["k"]): s for s in on_disk["step_costs"]}
    assert set(costs) == {(m, B, k) for m, k in (("ar", 0), ("draft", 4), ("pass", 4)) for B in (1, 2)}
    proj = {(r["method"], r["batch"]): r for r in on_disk["rows"] if r["projected"]}
    for B in (1, 2):
        ar, pas = proj[("ar", B)], proj[("pass", B)]
        # a busy CPU can make a step cost unmeasurable: then the row says so instead of giving a number
        for r, cost in ((ar, costs[("ar", B, 0)]), (pas, costs[("pass", B, 4)])):
            assert (r["status"] == "ok") == (cost["status"] == "ok"), (r, cost)
            assert r["tokens_per_s"] is None  # a projection has no end-to-end time
        if ar["status"] == "ok":
            assert ar["decode_tokens_per_s"] == pytest.approx(B / costs[("ar", B, 0)]["step_s"])
            assert ar["roofline_pct"] > 0
        if pas["status"] == "ok":
            real = next(r for r in on_disk["rows"] if (r["model"], r["method"], r["batch"]) == ("toy", "pass", B))
            assert pas["tokens_per_forward"] == real["tokens_per_forward"] and pas["tpf_source"] == f"toy B={B}"
            step = costs[("pass", B, 4)]["step_s"]
            assert pas["decode_tokens_per_s"] == pytest.approx(B * real["tokens_per_forward"] / step)
            if ar["status"] == "ok":
                assert pas["decode_speedup_vs_ar"] == pytest.approx(
                    pas["decode_tokens_per_s"] / ar["decode_tokens_per_s"])
        # no real model measured draft: the projection says so instead of inventing a number
        assert proj[("draft", B)]["status"] == "n/a" and proj[("draft", B)]["decode_tokens_per_s"] is None
    # the real part's rows survived the merge
    assert any(r["model"] == "toy" and r["method"] == "pass" for r in on_disk["rows"])

    capsys.readouterr()
    bg.main(["--report-only", "--readme", "--out", out])
    text = capsys.readouterr().out
    assert "| toy | greedy | 1 | pass k=4 |" in text
    assert "llama-3.1-8b@tiny (random) | greedy | 2 | pass k=4 * |" in text
    assert "| model | method | B=1 | B=2 |" in text  # the README summary
    pytest.importorskip("matplotlib")
    assert os.path.getsize(os.path.splitext(out)[0] + ".png") > 0

    # The same two parts measured apart (as on two GPUs at once) and folded together with --merge.
    real_only, random_only = str(tmp_path / "real.json"), str(tmp_path / "random.json")
    bg.save_results(res, real_only)
    bg.main(common[:-5] + ["--out", random_only, "--fresh", "--tiny", "--settings", "greedy",
                           "--rows", "ar,draft,pass", "--models", "llama-3.1-8b"])
    bg.main(["--report-only", "--merge", random_only, "--out", real_only])
    merged = json.load(open(real_only))
    assert {r["model"] for r in merged["rows"]} == {"toy", "llama-3.1-8b@tiny"}
    assert len(merged["runs"]) == 1 and set(merged["models"]) == {"toy", "llama-3.1-8b@tiny"}
    assert {(s["method"], s["batch"], s["k"]) for s in merged["step_costs"]} == set(costs)
    pas = next(r for r in merged["rows"] if r["projected"] and (r["method"], r["batch"]) == ("pass", 1))
    assert pas["tpf_source"] == "toy B=1" or pas["status"] != "ok"


def test_prefill_hook_times_or_skips_and_restores(bg):
    """Random models commit the prompt lengths without running them; real models' prefill is timed; both
    leave generate's prefill as it was."""
    gen = importlib.import_module("pass_ext.generate")
    original = gen.prefill
    model = bg.random_model("llama-3.2-1b", "cpu", **bg.TINY)
    with bg.PrefillHook("skip", torch.device("cpu")) as hook:
        assert hook.active, "generate.prefill changed: update bench_generate.PrefillHook"
        cache = model.new_cache(2, 64)
        c = gen.prefill(model, cache, [[5, 6, 7], [8, 9]], 512)
        assert cache.lens.tolist() == [2, 1] and c.tolist() == [7, 9]
        assert not cache.k[0].any()  # nothing ran
    assert gen.prefill is original
    with bg.PrefillHook("time", torch.device("cpu")) as hook:
        cache = model.new_cache(2, 64)
        c = gen.prefill(model, cache, [[5, 6, 7], [8, 9]], 512)
        assert cache.lens.tolist() == [2, 1] and c.tolist() == [7, 9] and cache.k[0].any()
        assert hook.seconds > 0
    assert gen.prefill is original


def test_missing_model_is_skipped_not_fetched(bg, tmp_path, monkeypatch):
    """No network on the benchmark machine: a model absent from the cache is reported and skipped at once."""
    monkeypatch.setenv("PASS_EXT_CACHE", str(tmp_path / "cache"))
    args = bg.parse_args(["--device", "cpu", "--models", "smollm2-135m", "--out", str(tmp_path / "g.json")])
    res = bg.empty_results()
    res["prompts"] = PROMPTS
    bench = bg.Bench(args, res)
    bench.run()
    assert res["rows"] == [] and "SmolLM2-135M-Instruct.Q4_1.gguf is missing" in bench.skipped[0]
    with pytest.raises(SystemExit):
        bg.parse_args(["--models", "llama-4-2t"])


def test_divergences_are_measured_in_ulps_at_the_first_difference(bg, tiny_hf_model):
    """A greedy row that differs from ar is scored where it first differs: the two tokens' logits in a plain
    forward of the common prefix, in ulps of the model's dtype; within NEAR_TIE_ULPS it counts as a near-tie."""
    model = pass_ext.load_model(tiny_hf_model("llama", seed=0, max_position_embeddings=512), device="cpu")
    bench = bg.Bench(bg.parse_args(["--device", "cpu"]), bg.empty_results())
    prompts = [[5, 6, 7], [8, 9]]
    bench.tie_model = (model, prompts)
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0] + [11]]), torch.arange(4)[None], model.new_cache(1, 5))[0, -1]
    order = logits.argsort(descending=True).tolist()
    ref = [[11, order[0], 3], [4, 4]]
    got = [[11, order[1], 2], [4]]          # row 1 differs at position 1; row 2 only stopped early
    row = dict(setting="greedy", model="toy", batch=2, method="pass", note="")
    bench.explain_divergences(row, got, ref)
    a, b = logits[order[0]].item(), logits[order[1]].item()
    expect = abs(a - b) / (2.0 ** (math.frexp(max(abs(a), abs(b)))[1] - 1) * torch.finfo(torch.float32).eps)
    assert row["max_tie_ulps"] == pytest.approx(expect, rel=1e-3, abs=0.01)
    assert row["near_ties"] == int(expect <= bg.NEAR_TIE_ULPS)


def test_prompts_file_takes_a_results_file(bg, tmp_path):
    """--prompts-file reads {'prompts': {...}} (an earlier results file) or the bare {'code', 'english'} dict, and
    refuses one with too few prompts for the batches asked, naming the counts."""
    results = tmp_path / "generate_old.json"
    results.write_text(json.dumps({"schema": 1, "prompts": PROMPTS, "rows": []}))
    bare = tmp_path / "prompts.json"
    bare.write_text(json.dumps(PROMPTS))
    for path in (results, bare):
        args = bg.parse_args(["--prompts-file", str(path), "--batches", "1,8"])
        assert bg.load_prompts(args, {}) == PROMPTS
    args = bg.parse_args(["--prompts-file", str(results), "--batches", "1,128"])
    with pytest.raises(SystemExit, match="need 64 code and 64 English prompts, have 32 and 32"):
        bg.load_prompts(args, {})


def test_hf_rows_run_every_token_when_the_model_has_an_eos(bg, tiny_hf_model):
    """transformers fills the EOS left None in a GenerationConfig from the model's own, so an Instruct model's
    call could stop after a few tokens while ours emit all of them, and a long-minus-short decode rate would be
    made of two equally short calls. Here the toy model's EOS is the token it emits first (greedy) and a token
    of its first sampled step's top 10: every HF row still emits --new tokens, and the model's EOS is back after."""
    from transformers import GenerationConfig
    hf = tiny_hf_model("llama", seed=0, max_position_embeddings=512)
    ids = [[5, 6, 7, 8], [9, 10, 11, 12]]
    with torch.no_grad():
        first = hf(torch.tensor(ids[:1])).logits[0, -1]
    top = first.argsort(descending=True)[:10].tolist()
    for eos in (top[0], top[:10]):
        hf.generation_config.eos_token_id = eos
        with torch.no_grad():  # the trap itself: without the switch, greedy generate stops at once
            out = hf.generate(input_ids=torch.tensor(ids[:1]), generation_config=GenerationConfig(
                max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None))
        if eos == top[0]:
            assert out.shape[1] == 5, "transformers no longer fills the EOS from the model: simplify without_eos"
        bench = bg.Bench(bg.parse_args(["--device", "cpu", "--new", "6", "--repeats", "1", "--out", "unused.json"]),
                         bg.empty_results())
        bench.describe("toy", pass_ext.load_model(hf, device="cpu"), "real", None)
        for setting in ("greedy", "T0.8/top-k10"):
            for B in (1, 2):
                row = bench.measure_hf("toy", hf, ids[:B], "hf-eager", setting, 0, None)
                assert row["status"] == "ok", row
                assert row["tokens_per_s_runs"] and row["tokens_per_s"] > 0
        assert hf.generation_config.eos_token_id == eos


def test_divergences_past_the_ulp_line_are_checked_against_float32(bg, tiny_hf_model):
    """A bf16 divergence wider than NEAR_TIE_ULPS is measured again with the same weights in float32: the two tokens'
    true gap over the bf16 forward's error on their two logits; up to 1, 'within rounding'. A runner-up can be
    that close, the vocabulary's last-ranked token is not."""
    hf = tiny_hf_model("llama", seed=0, max_position_embeddings=512)
    low = pass_ext.load_model(hf, dtype=torch.bfloat16, device="cpu")
    exact = pass_ext.load_model(hf, dtype=torch.float32, device="cpu")
    prompts = [[5, 6, 7], [8, 9, 10]]

    def logits(model, prefix):
        with torch.no_grad():
            return model(torch.tensor([prefix]), torch.arange(len(prefix))[None],
                         model.new_cache(1, len(prefix) + 1))[0, -1].float()

    want, got = [], []
    for r, prompt in enumerate(prompts):
        order = logits(low, prompt + [11]).argsort(descending=True).tolist()
        want.append([11, order[0], 3])
        got.append([11, order[1] if r == 0 else order[-1], 3])  # row 0 the runner-up, row 1 the last-ranked
    ratios = bg.within_rounding_error(exact, prompts, got, want, bg.divergence_logits(low, prompts, got, want))
    for r, ratio in enumerate(ratios):
        l16, l32 = logits(low, prompts[r] + [11]), logits(exact, prompts[r] + [11])
        a, b = want[r][1], got[r][1]
        error = abs(l16[a] - l32[a]).item() + abs(l16[b] - l32[b]).item()
        assert ratio == pytest.approx(abs(l32[a] - l32[b]).item() / error, rel=1e-4)
    assert ratios[1] > 1.0  # the last-ranked token is no tie

    bench = bg.Bench(bg.parse_args(["--device", "cpu", "--dtype", "bfloat16"]), bg.empty_results())
    bench.tie_model, bench.tie_exact = (low, prompts), lambda: exact
    row = dict(setting="greedy", model="toy", batch=2, method="pass", note="")
    bench.explain_divergences(row, got, want)
    ulps = bg.divergence_ulps(low, prompts, got, want)
    past = [r for r, u in enumerate(ulps) if u > bg.NEAR_TIE_ULPS]
    assert row["near_ties"] == 2 - len(past) and 1 in past
    assert row["within_rounding"] == sum(ratios[r] <= 1.0 for r in past)
    assert row["max_gap_over_error"] == pytest.approx(max(ratios[r] for r in past), rel=1e-3)
