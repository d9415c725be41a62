"""method="pass-tree": the draft-tree layout (masks.tree_layout, default_tree), the KV move of the accepted
path (KVCache.move), and the engine's losslessness on trees whose accepted paths leave the first branch:
greedy equal to plain decoding, sampling equal in law (chi-square against exact enumeration)."""
import pytest
import torch

import pass_ext
from pass_ext import masks
from pass_ext.lookahead import LookaheadEmbeddings
from sampling_reference import chi_square_pvalue, warp
from test_engine import CUDA, exact_joint, tiny_peaky_llama

DEVICES = ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])]


# ---------------------------------------------------------------- layout

def brute_force(paths, k):
    """Mask and offsets of a tree step from the definition: a token sees the tokens of its own path."""
    paths = sorted(paths, key=lambda t: (len(t), t))
    nodes = [()] + paths
    tokens = [(p, None) for p in nodes] + [(p, i) for p in nodes for i in range(k)]   # (node path, LA index)
    Q = len(tokens)
    mask = torch.zeros(Q, Q, dtype=torch.bool)
    offsets = torch.zeros(Q, dtype=torch.long)
    for a, (pa, ia) in enumerate(tokens):
        offsets[a] = len(pa) + (0 if ia is None else ia + 1)
        for b, (pb, ib) in enumerate(tokens):
            if ib is None:      # a node: seen by tokens whose path goes through it
                mask[a, b] = pa[: len(pb)] == pb
            else:               # a look-ahead token: only by its own group, causally
                mask[a, b] = ia is not None and pa == pb and ib <= ia
    return mask, offsets


@pytest.mark.parametrize("paths, k", [([(0,)], 1), ([(0,), (1,), (2,)], 1), ([(0,), (0, 0)], 2),
                                      ([(1,), (0,), (0, 1), (0, 0), (1, 0), (0, 0, 3)], 3)])
def test_tree_layout_matches_the_definition(paths, k):
    lay = masks.tree_layout(paths, k)
    mask, offsets = brute_force(paths, k)
    assert torch.equal(lay.mask, mask) and torch.equal(lay.offsets, offsets)
    assert lay.rows == (len(paths) + 1) * (k + 1)
    nodes = [()] + lay.paths
    for v, p in enumerate(nodes):
        assert lay.depth[v] == len(p)
        assert [nodes[int(u)] for u in lay.path[v, : len(p) + 1]] == [p[:d] for d in range(len(p) + 1)]
        assert (lay.path[v, len(p) + 1:] == 0).all()
        if p:
            assert lay.rank[v] == p[-1]


def test_the_fused_layout_is_a_chain_tree():
    """Fused mode's block (DESIGN §1.2) is the tree of a chain of k nodes, by the definition above."""
    for k in (1, 2, 4):
        mask, offsets = brute_force([(0,) * d for d in range(1, k + 1)], k)
        got_mask, got_offsets = masks.fused_layout(k)
        assert torch.equal(got_mask, mask) and torch.equal(got_offsets, offsets)
        assert mask.shape == ((k + 1) ** 2, (k + 1) ** 2)


@pytest.mark.parametrize("paths, k, words", [([], 1, "at least one"), ([(0, 0)], 2, "parent"),
                                             ([(0,), (0,)], 1, "repeat"), ([(0, 0)], 1, "1..k"),
                                             ([(-1,)], 1, ">= 0"), ([("a",)], 1, "ranks"), ([()], 1, "1..k")])
def test_tree_layout_refuses_bad_paths(paths, k, words):
    with pytest.raises(ValueError, match=words):
        masks.tree_layout(paths, k)


def test_default_tree_fills_eight_rows_and_keeps_parents():
    assert masks.default_tree(1) == [(0,), (1,), (2,)]
    for k in range(1, 7):
        tree = masks.default_tree(k)
        assert len(tree) >= k and (masks.tree_layout(tree, k).rows <= masks.TREE_ROWS or len(tree) == k)
    tree = masks.default_tree(2, 40)
    assert len(tree) == 40 and masks.tree_layout(tree, 2).nodes == 41
    assert len(masks.default_tree(1, 20)) == 20


# ---------------------------------------------------------------- KV move

@pytest.mark.parametrize("device", DEVICES)
def test_kv_move_copies_every_layer_reading_before_writing(device):
    hf = tiny_peaky_llama(layers=3)
    model = pass_ext.load_model(hf, dtype=torch.float32, device=device)
    cache = model.new_cache(3, 16)
    assert cache.k[1].data_ptr() == cache.store[0, 1].data_ptr()
    assert cache.v[2].data_ptr() == cache.store[1, 2].data_ptr()
    torch.manual_seed(0)
    cache.store.normal_()
    cache.lens.copy_(torch.tensor([2, 0, 7], dtype=torch.int32))
    before = [t.clone() for t in (*cache.k, *cache.v)]
    src = torch.tensor([[3, 1], [1, 2], [2, 3]], device=device)      # row 0 swaps slots 3 and 1 into 1, 2
    dst = torch.tensor([[1, 2], [1, 2], [1, 2]], device=device)
    cache.move(src, dst)
    for old, new in zip(before, (*cache.k, *cache.v)):
        want = old.clone()
        for b, base in enumerate([2, 0, 7]):
            for s, d in zip(src[b].tolist(), dst[b].tolist()):
                want[b, :, base + d] = old[b, :, base + s]
        assert torch.equal(new, want)


def test_row_view_moves_in_the_whole_cache():
    model = pass_ext.load_model(tiny_peaky_llama(), dtype=torch.float32, device="cpu")
    cache = model.new_cache(2, 8)
    cache.store.copy_(torch.arange(cache.store.numel(), dtype=torch.float32).view_as(cache.store))
    want = cache.k[0][1, :, 3].clone()
    cache.row(1).move(torch.tensor([[3]]), torch.tensor([[0]]))
    assert torch.equal(cache.k[0][1, :, 0], want)


# ---------------------------------------------------------------- losslessness with wide trees

def wide_tree(vocab=16, parents=8, width=3):
    """Every token at depth 1, `width` candidates after each of the `parents` likeliest at depth 2 (41 nodes:
    123 rows, within the CUDA attention's 128): some draft is accepted at every step, and accepted paths run
    through nodes far from the first branch, so their K/V must move."""
    return [(r,) for r in range(vocab)] + [(r, c) for r in range(parents) for c in range(width)]


@pytest.fixture(scope="module", params=DEVICES)
def tiny(request):
    hf = tiny_peaky_llama()
    model = pass_ext.load_model(hf, dtype=torch.float32, device=request.param)
    model.lookahead = LookaheadEmbeddings.init(model, 4, seed=1)
    return hf, model


@pytest.mark.parametrize("tree, k", [(None, 1), (wide_tree(), 2), ([(0,), (1,), (0, 0), (1, 0), (0, 1)], 2)])
def test_greedy_tree_equals_ar(tiny, tree, k):
    hf, model = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 16, (n,), generator=g).tolist() for n in (1, 6, 3, 9)]
    ref = pass_ext.generate(model, prompts, method="ar", max_new_tokens=40, eos_token_id=False)
    out = pass_ext.generate(model, prompts, method="pass-tree", lookahead=k, draft_tree=tree, max_new_tokens=40,
                            eos_token_id=False)
    assert torch.equal(out.sequences, ref.sequences)
    hist = out.stats.accepted_length_histogram
    if tree is not None and len(tree) > 16:
        assert hist[0] == 0 and hist[2] > 0  # every step accepts depth 1; some reach depth 2 off the first branch


WIDE_SETTINGS = [dict(temperature=0.8, top_k=10, top_p=1.0), dict(temperature=1.0, top_k=0, top_p=1.0),
                 dict(temperature=1.5, top_k=0, top_p=0.8)]


@pytest.mark.parametrize("setting", WIDE_SETTINGS, ids=lambda s: f"T{s['temperature']}-k{s['top_k']}-p{s['top_p']}")
def test_wide_tree_sampling_matches_exact_distribution(tiny, setting):
    """The joint law of the first 3 new tokens equals exact enumeration under plain sampling when every step
    accepts one or two drafts through any branch. Fails falsely with probability 1e-4 (fixed seeds)."""
    hf, model = tiny
    if model.device.type == "cpu" and setting is not WIDE_SETTINGS[0]:
        pytest.skip("one setting on the CPU (about a minute each); every setting on CUDA")
    V, m, n = hf.config.vocab_size, 3, 6000
    prompt = [2, 5, 7]
    expected = exact_joint(hf, prompt, m, lambda l: warp(l, **setting))
    out = pass_ext.generate(model, [prompt] * n, method="pass-tree", lookahead=2, draft_tree=wide_tree(),
                            max_new_tokens=m, eos_token_id=False, seed=99, **setting)
    toks = torch.stack([t[:m] for t in out.new_tokens])
    counts = torch.bincount((toks * torch.tensor([V * V, V, 1])).sum(1), minlength=V ** m)
    p = chi_square_pvalue(counts, expected)
    assert p > 1e-4, f"{setting}: chi-square p-value {p:.2e}"
    assert out.stats.accepted_length_histogram[0] == 0


# ---------------------------------------------------------------- chains (one draft per look-ahead position)

CHAINS = [([(0,)], 1), ([(0,), (0, 0), (0, 0, 0)], 3), ([(0,)], 2)]   # the last: a chain shorter than its groups


def no_general_tree_step(monkeypatch):
    """Fail if a step takes the general tree path's top-k of the chosen group or its K/V move."""
    from pass_ext import engine
    from pass_ext.model import KVCache

    def refuse(*args, **kwargs):
        raise AssertionError("a chain step took the general tree path")
    monkeypatch.setattr(engine, "top_tokens", refuse)
    monkeypatch.setattr(KVCache, "move", refuse)


@pytest.mark.parametrize("tree, k", CHAINS)
def test_chain_step_greedy_equals_ar_and_the_general_step(tiny, tree, k, monkeypatch):
    """A chain takes every token in one `sample` call and moves no K/V (`TreePassEngine.chain_step`): greedy
    output equal to plain decoding and to the general tree step (PASS_EXT_TREE_CHAIN_STEP=0), with the same
    accepted lengths step for step."""
    hf, model = tiny
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 16, (n,), generator=g).tolist() for n in (1, 6, 3, 9)]
    kw = dict(method="pass-tree", lookahead=k, draft_tree=tree, max_new_tokens=40, eos_token_id=False)
    ref = pass_ext.generate(model, prompts, method="ar", max_new_tokens=40, eos_token_id=False)
    monkeypatch.setenv("PASS_EXT_TREE_CHAIN_STEP", "0")
    general = pass_ext.generate(model, prompts, **kw)
    monkeypatch.setenv("PASS_EXT_TREE_CHAIN_STEP", "1")
    with monkeypatch.context() as m:
        no_general_tree_step(m)
        pass_ext.release_workspace(model)
        chain = pass_ext.generate(model, prompts, **kw)
    assert torch.equal(chain.sequences, ref.sequences)
    assert torch.equal(general.sequences, ref.sequences)
    assert chain.stats.forward_passes == general.stats.forward_passes
    assert chain.stats.accepted_length_histogram == general.stats.accepted_length_histogram
    assert sum(chain.stats.accepted_length_histogram[1:]) > 0  # some drafts were accepted


def test_chain_step_switch_must_be_0_or_1(tiny, monkeypatch):
    hf, model = tiny
    monkeypatch.setenv("PASS_EXT_TREE_CHAIN_STEP", "on")
    with pytest.raises(ValueError, match="PASS_EXT_TREE_CHAIN_STEP must be '0' or '1', got 'on'"):
        pass_ext.generate(model, [[2, 3]], method="pass-tree", lookahead=1, draft_tree=1, max_new_tokens=4,
                          eos_token_id=False, cuda_graphs=False)


@pytest.mark.parametrize("setting", WIDE_SETTINGS[:2], ids=lambda s: f"T{s['temperature']}-k{s['top_k']}")
def test_chain_step_sampling_matches_exact_distribution(tiny, setting, monkeypatch):
    """The chain step samples the nodes and takes the look-ahead rows' argmax in one call: the joint law of the
    first 3 new tokens equals exact enumeration under plain sampling, with drafts accepted at some steps. All
    6000 rows' logits in one lm_head call (the chain step's condition) by raising PASS_EXT_FUSED_HEAD_MAX_ROWS.
    Fails falsely with probability 1e-4 (fixed seeds)."""
    hf, model = tiny
    if model.device.type == "cpu" and setting is not WIDE_SETTINGS[0]:
        pytest.skip("one setting on the CPU; every setting on CUDA")
    monkeypatch.setenv("PASS_EXT_FUSED_HEAD_MAX_ROWS", str(1 << 20))
    no_general_tree_step(monkeypatch)
    V, m, n = hf.config.vocab_size, 3, 6000
    prompt = [2, 5, 7]
    expected = exact_joint(hf, prompt, m, lambda l: warp(l, **setting))
    out = pass_ext.generate(model, [prompt] * n, method="pass-tree", lookahead=2, draft_tree=[(0,), (0, 0)],
                            max_new_tokens=m, eos_token_id=False, seed=7, **setting)
    toks = torch.stack([t[:m] for t in out.new_tokens])
    counts = torch.bincount((toks * torch.tensor([V * V, V, 1])).sum(1), minlength=V ** m)
    p = chi_square_pvalue(counts, expected)
    assert p > 1e-4, f"{setting}: chi-square p-value {p:.2e}"
    assert sum(out.stats.accepted_length_histogram[1:]) > 0


# ---------------------------------------------------------------- bad requests

@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(method="pass", draft_tree=3), ValueError, "only used by method='pass-tree'"),
    (dict(method="pass-tree", draft_tree=0), ValueError, "1..127"),
    (dict(method="pass-tree", draft_tree="wide"), TypeError, "draft_tree"),
    (dict(method="pass-tree", draft_tree=[(0, 0)], lookahead=2), ValueError, "draft_tree: .*parent"),
    (dict(method="pass-tree", draft_tree=[(0,), (0, 0)], lookahead=1), ValueError, "draft_tree: .*1..k"),
    (dict(method="pass-tree", draft_tree=[(16,)]), ValueError, "vocabulary has 16"),
    (dict(method="pass-tree", lookahead="auto", draft_tree=3), ValueError, "draft_tree must be None with lookahead='auto'"),
    (dict(method="pass-tree", lookahead=5), ValueError, "lookahead"),
])
def test_bad_tree_requests(tiny, kwargs, exc, words):
    hf, model = tiny
    with pytest.raises(exc, match=words):
        pass_ext.generate(model, [[2, 3, 4]], max_new_tokens=4, **kwargs)


@CUDA
@pytest.mark.cuda
def test_tree_rows_past_the_cuda_attention_limit_are_refused():
    model = pass_ext.load_model(tiny_peaky_llama(), dtype=torch.float32, device="cuda")
    model.lookahead = LookaheadEmbeddings.init(model, 4, seed=1)
    with pytest.raises(ValueError, match="at most 128"):
        pass_ext.generate(model, [[2, 3]], method="pass-tree", lookahead=1, draft_tree=64, max_new_tokens=4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("V, w", [(151936, 3), (49152, 8), (997, 2), (16, 16), (4099, 1)])
def test_top_tokens_equals_topk(device, V, w):
    """The two-round top-w of the tree's drafts picks what torch.topk does (no ties in random logits)."""
    from pass_ext.engine import top_tokens
    x = torch.randn(4, V, generator=torch.Generator().manual_seed(V)).to(device)
    assert torch.equal(top_tokens(x, w), x.topk(w, dim=-1).indices)


# ---------------------------------------------------------------- lookahead="auto" over trees

def test_expected_tree_tokens_from_the_definition():
    """E(tree) = 1 + the sum over nodes of the product of their ranks' weights; default_tree takes the likeliest
    paths under the profile it is given."""
    prof = [[0.5, 0.2, 0.01], [0.3, 0.1]]
    paths = [(0,), (1,), (0, 0), (0, 1)]
    assert masks.expected_tree_tokens(paths, prof) == pytest.approx(1 + 0.5 + 0.2 + 0.5 * 0.3 + 0.5 * 0.1)
    assert masks.rank_weight(prof, 5, 3) == pytest.approx(0.1 * 0.9 ** 2)   # deeper rows and ranks extrapolate
    assert masks.default_tree(2, 3, prof) == [(0,), (1,), (0, 0)]
    assert masks.default_tree(2, 3, [[0.5, 0.1], [0.9, 0.1]]) == [(0,), (0, 0), (1,)]
    assert masks.default_tree(2, 3) == masks.default_tree(2, 3, masks.RANK_PROFILE)


def test_rank_profile_follows_measured_acceptance(tiny):
    """Without tree calls, the profile is RANK_PROFILE's shape scaled per depth to the measured top-1 acceptance
    (whose position d is exactly the profile's rank 0 at depth d), capped to probabilities."""
    from pass_ext import autotune
    la = LookaheadEmbeddings.init(tiny[1], 2, seed=0)
    assert autotune.rank_profile(la, False) == [list(r) for r in masks.RANK_PROFILE]
    la.meta["acceptance"] = {"greedy": [0.3, 0.99]}
    prof = autotune.rank_profile(la, False)
    assert prof[0][0] == pytest.approx(0.3)
    assert prof[0][1] / prof[0][0] == pytest.approx(masks.RANK_PROFILE[0][1] / masks.RANK_PROFILE[0][0])
    assert sum(prof[1]) <= 1.0 + 1e-9 and all(0 <= w <= 1 for row in prof for w in row)
    assert autotune.rank_profile(la, True) == [list(r) for r in masks.RANK_PROFILE]  # sampled is kept apart


def test_tree_acceptance_calibrates_the_profile(tiny):
    """Calls whose steps reach each depth at a fixed rate move the profile until the tree's predicted rates match
    them; a call with too few steps changes nothing."""
    from pass_ext import autotune
    la = LookaheadEmbeddings.init(tiny[1], 2, seed=0)
    paths = masks.default_tree(2, 4)
    autotune.record_tree_acceptance(la, False, paths, [2, 2, 1])
    assert "rank_profile" not in la.meta
    for _ in range(60):   # 40% of steps stop at the root, 40% at depth 1, 20% reach depth 2
        autotune.record_tree_acceptance(la, False, paths, [40, 40, 20])
    prof = autotune.rank_profile(la, False)
    depth1 = sum(masks.path_probability(p, prof) for p in paths if len(p) == 1)
    depth2 = sum(masks.path_probability(p, prof) for p in paths if len(p) == 2)
    assert depth1 == pytest.approx(0.6, rel=1e-3) and depth2 == pytest.approx(0.2, rel=1e-3)
    assert "greedy" in la.meta["rank_profile"] and "sampled" not in la.meta["rank_profile"]


def test_choose_tree_weighs_tokens_against_step_cost():
    from pass_ext import autotune
    prof = [list(r) for r in masks.RANK_PROFILE]
    costs = {(0, 0): 1.0, (1, 1): 1.05, (1, 3): 1.1, (2, 4): 1.3}
    e = {o: masks.expected_tree_tokens(masks.default_tree(*o, prof), prof) for o in costs if o != (0, 0)}
    best = max(e, key=lambda o: e[o] / costs[o])
    assert autotune.choose_tree(costs, prof) == best
    assert autotune.choose_tree({(0, 0): 1.0, (1, 3): 2.0}, prof) == (0, 0)      # 1.76 tokens cannot pay 2x
    assert autotune.choose_tree(costs, [[0.01] * 8] * 3) == (0, 0)             # drafts almost never land
    second = sorted(e, key=lambda o: e[o] / costs[o])[-2]
    if e[second] / costs[second] * 1.05 >= e[best] / costs[best]:
        assert autotune.choose_tree(costs, prof, previous=second) == second    # a near-tie keeps the last pick
    assert autotune.tree_options(1) == [(1, 1), (1, 3), (1, 7)]
    assert all((n + 1) * (k + 1) <= 9 for k, n in autotune.tree_options(4, max_rows=9))


@pytest.mark.parametrize("sampled", [False, True])
def test_auto_tree_is_lossless_and_reports_its_pick(tiny, sampled):
    """lookahead="auto" with pass-tree measures every candidate's step once per bucket, runs the tree it picks
    (greedy: plain decoding's tokens; sampled: the same seed gives the same tokens again) and records the call's
    acceptance in the profile."""
    hf, model = tiny
    model.__dict__.pop("step_costs", None)
    model.__dict__.pop("auto_tree", None)
    model.lookahead.meta.pop("rank_profile", None)
    prompts = [[3, 4, 5, 6], [7, 8]]
    kw = dict(max_new_tokens=24, eos_token_id=False, temperature=0.8 if sampled else 0.0, seed=5)
    ref = pass_ext.generate(model, prompts, method="ar", **kw)
    out = pass_ext.generate(model, prompts, method="pass-tree", lookahead="auto", **kw)
    costs = {key[-1]: v for key, v in model.step_costs.items() if key[1] == 2}
    assert set(costs) >= {0, *autotune_options(model)} and all(v > 0 for v in costs.values())
    if out.stats.k == 0:
        assert out.stats.draft_tree is None
    else:
        assert out.stats.draft_tree and max(len(p) for p in out.stats.draft_tree) <= out.stats.k
        assert model.lookahead.meta["rank_profile"]["sampled" if sampled else "greedy"]
    if not sampled:
        assert torch.equal(out.sequences, ref.sequences)
    again = pass_ext.generate(model, prompts, method="pass-tree", lookahead="auto", **kw)
    if again.stats.draft_tree == out.stats.draft_tree:
        assert torch.equal(again.sequences, out.sequences)


def autotune_options(model):
    from pass_ext import autotune
    return autotune.tree_options(model.lookahead.k, pass_ext.ops.CUDA_MAX_Q if model.device.type == "cuda" else None)


def test_auto_tree_picks_plain_decoding_when_trees_cannot_pay(tiny):
    from pass_ext import autotune
    hf, model = tiny
    prompts = [[3, 4, 5]]
    ctx = autotune.context_bucket(3 + 10 // 2)
    model.__dict__["step_costs"] = {("ar", 1, ctx, False, 0): 1.0}
    for opt in autotune_options(model):
        model.step_costs[("pass-tree", 1, ctx, False, opt)] = 5.0
    model.__dict__.pop("auto_tree", None)
    ref = pass_ext.generate(model, prompts, method="ar", max_new_tokens=10, eos_token_id=False)
    out = pass_ext.generate(model, prompts, method="pass-tree", lookahead="auto", max_new_tokens=10,
                            eos_token_id=False)
    assert out.stats.k == 0 and out.stats.draft_tree is None
    assert torch.equal(out.sequences, ref.sequences)
    model.__dict__.pop("step_costs")
