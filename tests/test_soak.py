"""bench/soak.py on a tiny model: a short soak runs every method, greedy and sampled, and passes its checks; a
per-call leak of memory or of CUDA graphs is caught; the flatness rule itself on synthetic series."""
import importlib.util
import io
import json
import os
import random
import sys

import pytest
import torch

import pass_ext
from pass_ext.lookahead import LookaheadEmbeddings


@pytest.fixture(scope="module")
def soak():
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "soak.py")
    spec = importlib.util.spec_from_file_location("bench_soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tiny_hf_model):
    """(float32 CPU model with untrained look-ahead embeddings, a pool of prompts)."""
    model = pass_ext.load_model(tiny_hf_model("llama", seed=2), dtype=torch.float32, device="cpu")
    model.lookahead = LookaheadEmbeddings.init(model, 3, seed=1)
    rng = random.Random(0)
    pool = [[rng.randrange(3, 64) for _ in range(rng.randint(2, 20))] for _ in range(8)]
    return model, pool


def test_short_soak_passes(soak, tiny, tmp_path):
    model, pool = tiny
    res = soak.soak(model, prompts=pool, tokens=600, batch_sizes=(1, 3), new_tokens=(4, 12), progress=False)
    assert res["ok"], soak.report(res)
    assert set(res["per_method"]) == set(soak.METHODS)
    assert all(m["calls"] > 0 and m["tokens"] > 0 for m in res["per_method"].values())
    assert res["tokens"] >= 600 and res["calls"] == len(res["records"])
    assert res["warmup_calls"] == 2 * 2 * len(soak.METHODS)  # (batch size, greedy/sampled) pairs x methods
    assert {r["greedy"] for r in res["rounds"]} == {True, False}
    assert len({len(r["prompt_lengths"]) for r in res["rounds"]}) == 2
    assert res["checks"]["greedy_equals_ar"]["asserted"] and res["checks"]["greedy_equals_ar"]["rows_compared"] > 0
    assert len(res["checks"]["reproducible"]["calls"]) >= 2
    assert set(res["checks"]) == {"rss", "graphs", "reproducible", "greedy_equals_ar"}  # no CUDA series on CPU
    text = io.StringIO()
    soak.write_json(res, text)
    assert json.loads(text.getvalue()) == res
    soak.plot(res, str(tmp_path / "soak.png"))
    assert (tmp_path / "soak.png").stat().st_size > 0
    assert soak.report(res).endswith("PASS")


def test_soak_catches_leaks(soak, tiny, monkeypatch):
    """Every call keeps 40 MiB and a (stand-in) CUDA graph alive: both series grow after warm-up and fail.
    (40 MiB: above glibc's largest mmap threshold, so each leak is fresh memory whatever earlier tests freed.)"""
    model, pool = tiny

    class FakeGraph:
        pass

    kept = []
    real_call = soak.run_call

    def leaky_call(*args):
        kept.append((torch.ones(10 * 2 ** 20), FakeGraph()))
        return real_call(*args)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(soak, "run_call", leaky_call)
    res = soak.soak(model, prompts=pool, tokens=100, batch_sizes=(1, 2), new_tokens=(2, 4), rss_tol_mib=4,
                    progress=False)
    assert not res["ok"]
    assert not res["checks"]["graphs"]["ok"] and res["checks"]["graphs"]["growth"] >= 8
    assert not res["checks"]["rss"]["ok"], res["checks"]["rss"]
    assert res["checks"]["reproducible"]["ok"] and res["checks"]["greedy_equals_ar"]["ok"]


def test_flatness_rule(soak):
    mib = 2 ** 20
    flat = [100 * mib, 103 * mib, 101 * mib] + [102 * mib, 103 * mib] * 10
    assert soak.flatness(flat, 3, 0.01, 4 * mib)["ok"]
    leak = [100 * mib] * 3 + [(100 + i) * mib for i in range(20)]
    verdict = soak.flatness(leak, 3, 0.01, 4 * mib)
    assert not verdict["ok"] and verdict["growth"] == 19 * mib and verdict["slope_per_call"] == pytest.approx(mib)
    assert soak.flatness([0, 0, 1], 2, 0.0, 0)["ok"] is False  # one more live graph after warm-up is a leak
    assert soak.flatness([5, 5], 2, 0.01, 0)["ok"]  # nothing after warm-up: nothing to judge
