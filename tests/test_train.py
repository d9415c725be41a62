"""Look-ahead training: a few steps on CPU lower the loss and raise acceptance over untrained embeddings;
the block layout matches the fused-mode semantics; saving/loading keeps the model binding."""
import pytest
import torch

import pass_ext
from pass_ext.lookahead import LookaheadEmbeddings
from pass_ext.train import evaluate, make_block, train_lookahead
from test_engine import tiny_peaky_llama


@pytest.fixture(scope="module")
def setup():
    model = pass_ext.load_model(tiny_peaky_llama(seed=11, sharpen=6.0), dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 16, (3,), generator=g).tolist() for _ in range(48)]
    gen = pass_ext.generate(model, prompts, method="ar", temperature=1.0, max_new_tokens=40, seed=0,
                            eos_token_id=False)
    seqs = [row.tolist() for row in gen.sequences]
    return model, seqs[:40], seqs[40:]


def test_block_layout():
    b = make_block(T=10, k=3, cuts=[0, 4])
    assert b.mask.shape == (16, 16) and b.la_slots.tolist() == list(range(10, 16))
    # Group after cut 4: LA_2 sees real tokens 0..4 and LA_1, LA_2 of its group, nothing else.
    row = b.mask[10 + 3 + 1]
    assert row[:5].all() and not row[5:10].any() and row[13:15].all() and not row[15]
    assert b.positions[13:16].tolist() == [5, 6, 7] and b.label[3:6].tolist() == [6, 7, 8]
    with pytest.raises(ValueError, match="cuts"):
        make_block(T=10, k=3, cuts=[7])


@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_training_lowers_loss_and_raises_acceptance(setup, objective):
    model, train, held = setup
    k, T = 3, 32
    start = LookaheadEmbeddings.init(model, k, seed=0)
    block = make_block(T, k, list(range(0, T - 1 - k, 2)))
    held_T = [s[:T] for s in held]
    before = evaluate(model, start, held_T, block, k, objective)
    la = train_lookahead(model, train, k=k, steps=60, seq_len=T, batch_size=8, cut_stride=2, lr=0.05,
                         objective=objective, progress=False, init=start)
    after = evaluate(model, la, held_T, block, k, objective)
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    assert sum(after["agreement"]) > sum(before["agreement"]), (before, after)

    prompts = [s[:4] for s in held]
    tpf = {}
    for name, emb in (("untrained", start), ("trained", la)):
        model.lookahead = emb
        tpf[name] = pass_ext.generate(model, prompts, method="pass", max_new_tokens=24,
                                      eos_token_id=False).stats.tokens_per_forward
    model.lookahead = None
    assert tpf["trained"] > tpf["untrained"], tpf


def test_save_load_and_fingerprint(setup, tmp_path):
    model, train, _ = setup
    la = LookaheadEmbeddings.init(model, 2)
    path = tmp_path / "la.safetensors"
    la.save(str(path))
    got = pass_ext.load_lookahead(model, str(path))
    assert torch.equal(got.weight, la.weight) and model.lookahead is got
    model.lookahead = None
    other = pass_ext.load_model(tiny_peaky_llama(seed=12), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="fingerprint"):
        pass_ext.load_lookahead(other, str(path))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="look-ahead file"):
        LookaheadEmbeddings.load(str(path))


def test_bad_training_arguments(setup):
    model, train, _ = setup
    with pytest.raises(ValueError, match="k must"):
        train_lookahead(model, train, k=0, steps=1, progress=False)
    with pytest.raises(ValueError, match="objective"):
        train_lookahead(model, train, k=2, steps=1, objective="mse", progress=False)
    with pytest.raises(ValueError, match="no sequence"):
        train_lookahead(model, train, k=2, steps=1, seq_len=500, progress=False)


def test_time_limit_stops_early_and_records_the_steps_done(setup):
    model, train, held = setup
    la = train_lookahead(model, train, k=2, steps=100000, seq_len=24, batch_size=2, eval_data=held,
                         time_limit=0.5, progress=False)
    assert 1 <= la.meta["steps"] < 100000
    assert la.meta["history"] and la.meta["history"][-1]["step"] == la.meta["steps"]
    with pytest.raises(ValueError, match="time_limit"):
        train_lookahead(model, train, k=2, steps=1, seq_len=24, time_limit=0, progress=False)


def test_self_generated_data_is_the_models_own_continuation(smollm2):
    from pass_ext.train import self_generated
    smollm2 = smollm2.model
    text = "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n" * 8
    seqs = self_generated(smollm2, [text], 3, prompt_len=12, new_tokens=6, batch_size=2, temperatures=(0.0,),
                          progress=False)
    assert len(seqs) == 3
    for s in seqs:
        assert 12 < len(s) <= 18
        ref = pass_ext.generate(smollm2, [s[:12]], method="ar", max_new_tokens=6)
        assert s[12:] == ref.new_tokens[0].tolist()  # greedy rows: exactly plain decoding's text
    with pytest.raises(ValueError, match="n_seqs"):
        self_generated(smollm2, [text], 0)
