"""Greedy losslessness on the real SmolLM2-135M (float32): every method returns plain decoding's tokens on real
prompts, one at a time and as a ragged batch."""
import copy
import dataclasses

import pytest
import torch

import pass_ext
from pass_ext.lookahead import LookaheadEmbeddings

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is",
    "import numpy as np\n\ndef softmax(x):",
    "Once upon a time, in a small village by the sea,",
]


def truncated(model, layers: int):
    """The first `layers` layers of `model` as a cheap draft model with the same vocabulary."""
    draft = copy.copy(model)
    draft._modules = dict(model._modules)
    draft.layers = torch.nn.ModuleList(list(model.layers)[:layers])
    draft.config = dataclasses.replace(model.config, num_layers=layers)
    draft.lookahead = None
    return draft


@pytest.fixture(scope="module")
def real(smollm2):
    model = smollm2.model
    if model.lookahead is None:
        model.lookahead = LookaheadEmbeddings.init(model, 4, seed=0)
    ids = [smollm2.tokenizer(p)["input_ids"] for p in PROMPTS]
    return model, truncated(model, 12), ids


@pytest.mark.parametrize("method", ["pass", "pass-paper", "draft"])
def test_real_greedy_equals_ar_ragged_batch(real, method):
    model, draft, ids = real
    kw = dict(max_new_tokens=40, eos_token_id=False)
    ref = pass_ext.generate(model, ids, method="ar", **kw)
    out = pass_ext.generate(model, ids, method=method, draft_model=draft if method == "draft" else None,
                            lookahead=3 if method == "draft" else None, **kw)
    for b in range(len(ids)):
        assert out.new_tokens[b].tolist() == ref.new_tokens[b].tolist(), (method, b)
    assert out.stats.tokens_per_forward >= 1.0


def test_real_single_prompt_matches_batched_and_transformers(real, smollm2):
    model, _, ids = real
    one = pass_ext.generate(model, [ids[0]], method="pass", max_new_tokens=32, eos_token_id=False)
    both = pass_ext.generate(model, ids[:2], method="pass", max_new_tokens=32, eos_token_id=False)
    assert one.new_tokens[0].tolist() == both.new_tokens[0].tolist()
    hf = smollm2.hf.generate(torch.tensor([ids[0]]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids[0]):].tolist()
    assert one.new_tokens[0].tolist() == hf
