"""The decode engine: every method is lossless — greedy outputs equal plain decoding token for token (float32),
sampled outputs follow the plain-sampling distribution (chi-square against exact enumeration) — with ragged
batches, per-row stops, and clear errors for bad requests."""
import importlib

import pytest
import torch

import pass_ext
from pass_ext.lookahead import LookaheadEmbeddings
from sampling_reference import chi_square_pvalue, warp

METHODS = ["pass", "pass-paper", "pass-tree", "draft"]


def tiny_peaky_llama(vocab=16, hidden=32, layers=2, heads=4, kv_heads=2, seed=0, sharpen=4.0):
    """A tiny random Llama (transformers) whose next-token distributions are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen / m.lm_head.weight.std())
        m.model.embed_tokens.weight.normal_()
    return m


CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and pass_ext.ops.has_cuda_kernels()),
                          reason="needs a CUDA GPU and the CUDA kernels")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])])
def tiny(request):
    """(transformers reference, our float32 model with untrained look-ahead embeddings, a draft model)."""
    hf = tiny_peaky_llama()
    model = pass_ext.load_model(hf, dtype=torch.float32, device=request.param)
    model.lookahead = LookaheadEmbeddings.init(model, 4, seed=1)
    draft = pass_ext.load_model(tiny_peaky_llama(layers=1, seed=3), dtype=torch.float32, device=request.param)
    return hf, model, draft


def run(model, ids, method, draft=None, **kw):
    return pass_ext.generate(model, ids, method=method, draft_model=draft if method == "draft" else None, **kw)


# ---------------------------------------------------------------- greedy: token-for-token equality

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [1, 3, 4])
@pytest.mark.parametrize("lengths", [(1, 5, 9, 2), (2, 5, 9, 3)])  # with a 1-token prompt the draft method's
def test_greedy_equals_ar_tiny_ragged(tiny, method, k, lengths):      # first round is fed one token, else two
    hf, model, draft = tiny
    g = torch.Generator().manual_seed(k)
    prompts = [torch.randint(2, 16, (n,), generator=g).tolist() for n in lengths]
    ref = run(model, prompts, "ar", max_new_tokens=40, eos_token_id=False)
    out = run(model, prompts, method, draft, lookahead=k, max_new_tokens=40, eos_token_id=False)
    for b in range(len(prompts)):
        assert out.new_tokens[b].tolist() == ref.new_tokens[b].tolist(), (method, k, b)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.stats.stop_reasons == ["max_new_tokens"] * 4
    assert sum(out.stats.accepted_length_histogram) > 0


@pytest.mark.parametrize("method", ["pass", "pass-paper", "pass-tree"])
def test_greedy_equals_ar_in_a_batch_of_48(tiny, method):
    """The benchmark's bf16 divergences from ar gather at B = 32 and 64, where a PaSS step projects hundreds of rows
    (cuBLAS past 16 on CUDA) and attention splits its keys for another grid: in float32 the tokens are still ar's,
    row for row, at that size."""
    hf, model, _ = tiny
    g = torch.Generator().manual_seed(48)
    prompts = [torch.randint(2, 16, (1 + (7 * i) % 23,), generator=g).tolist() for i in range(48)]
    ref = run(model, prompts, "ar", max_new_tokens=24, eos_token_id=False)
    out = run(model, prompts, method, lookahead=3, max_new_tokens=24, eos_token_id=False)
    differing = [b for b in range(len(prompts)) if out.new_tokens[b].tolist() != ref.new_tokens[b].tolist()]
    assert not differing, (method, differing)
    assert sum(out.stats.accepted_length_histogram[1:]) > 0  # drafts were accepted: the batch ran PaSS steps


def test_ar_matches_transformers_greedy(tiny):
    hf, model, _ = tiny
    prompt = [3, 7, 2, 9, 4]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    out = run(model, [prompt], "ar", max_new_tokens=30, eos_token_id=False)
    assert out.new_tokens[0].tolist() == ref


@pytest.mark.parametrize("method", ["ar"] + METHODS)
def test_per_row_eos_and_padding(tiny, method):
    hf, model, draft = tiny
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11, 12]]
    free = run(model, prompts, "ar", max_new_tokens=30, eos_token_id=False)
    # Pick as EOS a token that row 0 produces early: that row must stop right after it.
    eos = free.new_tokens[0][3].item()
    out = run(model, prompts, method, draft, max_new_tokens=30, eos_token_id=eos, pad_token_id=15)
    for b in range(3):
        full = free.new_tokens[b].tolist()
        cut = full.index(eos) + 1 if eos in full else len(full)
        assert out.new_tokens[b].tolist() == full[:cut]
        assert out.stats.stop_reasons[b] == ("eos" if eos in full else "max_new_tokens")
        row = out.sequences[b].tolist()
        assert row[: len(prompts[b])] == prompts[b]
        assert row[len(prompts[b]): len(prompts[b]) + cut] == full[:cut]
        assert all(t == 15 for t in row[len(prompts[b]) + cut:])


@pytest.mark.parametrize("method", ["ar"] + METHODS)
def test_length_stop_never_overflows_the_cache(tiny, method):
    hf, model, draft = tiny
    out = run(model, [[2, 3, 4]], method, draft, max_new_tokens=100, eos_token_id=False, max_length=40)
    assert out.stats.stop_reasons == ["length"]
    n = out.num_new_tokens[0].item()
    assert 0 < n < 40
    ref = run(model, [[2, 3, 4]], "ar", max_new_tokens=n, eos_token_id=False)
    assert out.new_tokens[0].tolist() == ref.new_tokens[0].tolist()


def test_stream_callable_gets_every_token_in_order(tiny):
    hf, model, _ = tiny
    got = {0: [], 1: []}
    out = run(model, [[2, 3], [4]], "pass", max_new_tokens=25, eos_token_id=False,
              stream=lambda row, toks: got[row].extend(toks))
    assert got[0] == out.new_tokens[0].tolist() and got[1] == out.new_tokens[1].tolist()


def test_stats_fields(tiny):
    hf, model, _ = tiny
    out = run(model, [[2, 3, 4]], "pass", max_new_tokens=32, eos_token_id=False)
    s = out.stats
    assert s.forward_passes >= 1 and s.elapsed_s > 0 and s.tokens_per_s > 0
    assert len(s.acceptance_by_position) == 4 and len(s.accepted_length_histogram) == 5
    assert all(0.0 <= a <= 1.0 for a in s.acceptance_by_position)
    # Every forward yields 1 + accepted tokens (fused mode) plus the first drafting pass's token.
    hist = s.accepted_length_histogram
    assert sum((a + 1) * c for a, c in enumerate(hist)) + 1 >= s.new_tokens
    assert 1.0 <= s.tokens_per_forward <= 5.0


# ---------------------------------------------------------------- sampling: exact distribution

def exact_joint(hf, prompt, m, warp) -> torch.Tensor:
    """P(x_1..x_m | prompt) of plain sampling, enumerated over all V^m continuations with the reference model."""
    V = hf.config.vocab_size
    probs = torch.ones(1, dtype=torch.float64)
    seqs = torch.tensor([prompt])
    for _ in range(m):
        with torch.no_grad():
            logits = hf(seqs).logits[:, -1].double()
        step = torch.stack([warp(l) for l in logits])                    # [n, V]
        probs = (probs[:, None] * step).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return probs                                                       # [V^m], lexicographic order


SETTINGS = [dict(temperature=1.0, top_k=0, top_p=1.0), dict(temperature=0.8, top_k=10, top_p=1.0),
            dict(temperature=1.3, top_k=5, top_p=0.9), dict(temperature=1.5, top_k=0, top_p=0.8)]


@pytest.mark.parametrize("method", ["ar"] + METHODS)
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"T{s['temperature']}-k{s['top_k']}-p{s['top_p']}")
def test_sampling_matches_exact_distribution(tiny, method, setting):
    """The joint law of the first 3 new tokens equals exact enumeration under plain sampling.

    Each case fails falsely with probability 1e-4 (the p-value threshold); the seeds are fixed, so a
    passing run stays passing."""
    hf, model, draft = tiny
    V, m, n = hf.config.vocab_size, 3, 6000
    prompt = [2, 5, 7]
    expected = exact_joint(hf, prompt, m, lambda l: warp(l, **setting))
    out = run(model, [prompt] * n, method, draft, lookahead=3, max_new_tokens=m, eos_token_id=False,
              seed=1234, **setting)
    toks = torch.stack([t[:m] for t in out.new_tokens])
    codes = (toks * torch.tensor([V * V, V, 1])).sum(1)
    counts = torch.bincount(codes, minlength=V ** m)
    p = chi_square_pvalue(counts, expected)
    assert p > 1e-4, f"{method} {setting}: chi-square p-value {p:.2e}"


@pytest.mark.parametrize("setting", SETTINGS[1:3], ids=lambda s: f"T{s['temperature']}-k{s['top_k']}-p{s['top_p']}")
def test_fused_one_head_call_matches_exact_distribution(tiny, monkeypatch, setting):
    """The fused step's single lm_head call (verify and draft logits of every group at once) keeps the law of
    plain sampling; at this batch the default limit would make two calls, so the limit is raised."""
    monkeypatch.setenv("PASS_EXT_FUSED_HEAD_MAX_ROWS", str(1 << 20))
    test_sampling_matches_exact_distribution(tiny, "pass", setting)


@pytest.mark.parametrize("limit, B, k, calls", [(None, 1, 4, 1), (None, 4, 3, 1), ("0", 1, 4, 2), ("63", 4, 3, 2),
                                                ("64", 4, 3, 1)])
def test_fused_step_projects_onto_the_vocabulary_once_within_the_limit(tiny, monkeypatch, limit, B, k, calls):
    """One lm_head call per fused step while B x (k+1)^2 <= PASS_EXT_FUSED_HEAD_MAX_ROWS (default 256), else
    the verify rows and the chosen group separately; greedy output equals plain decoding either way."""
    hf, model, _ = tiny
    if limit is not None:
        monkeypatch.setenv("PASS_EXT_FUSED_HEAD_MAX_ROWS", limit)
    prompts = [[2 + b, 5, 7 + b] for b in range(B)]
    ref = run(model, prompts, "ar", max_new_tokens=12, eos_token_id=False)
    rows = []
    head = type(model).lm_head_logits

    def spy(self, hidden):
        rows.append(hidden.shape[1] if hidden.dim() == 3 else 0)
        return head(self, hidden)

    monkeypatch.setattr(type(model), "lm_head_logits", spy)
    # eagerly: a captured step would call the spy once per capture, not once per step
    out = run(model, prompts, "pass", lookahead=k, max_new_tokens=12, eos_token_id=False, cuda_graphs=False)
    assert torch.equal(out.sequences, ref.sequences)
    first, other = ((k + 1) ** 2, k + 1) if calls == 1 else (k + 1, (k + 1) ** 2)
    steps = rows.count(first)                              # each step's first call: all its rows, or the verify rows
    assert steps >= out.stats.forward_passes > 0 and rows.count(other) == 0
    assert rows.count(k) == (steps if calls == 2 else 0)   # the chosen group's rows, in a second call
    assert len(rows) - steps * calls <= 1, rows            # and at most the prefill's own call


@pytest.mark.parametrize("B, k, limit, one_call", [(1, 1, None, True), (4, 1, None, True), (2, 3, None, True),
                                                    (9, 3, None, False), (1, 1, "0", False), (4, 1, "15", False)])
def test_greedy_fused_step_takes_every_argmax_in_one_call(tiny, monkeypatch, B, k, limit, one_call):
    """Within PASS_EXT_GREEDY_ROWS_MAX rows (default 128) a greedy fused step takes the argmax of all its rows in one
    `sample` call and runs no verify op; the tokens, the accepted-length histogram and the forwards are those of
    the verify op's path, and plain decoding's tokens."""
    hf, model, _ = tiny
    if limit is not None:
        monkeypatch.setenv("PASS_EXT_GREEDY_ROWS_MAX", limit)
    g = torch.Generator().manual_seed(B * 10 + k)
    prompts = [torch.randint(2, 16, (3 + 2 * b,), generator=g).tolist() for b in range(B)]
    kw = dict(lookahead=k, max_new_tokens=24, eos_token_id=False, cuda_graphs=False)
    verifies = []
    verify = pass_ext.ops.speculative_verify

    def spy(*args, **kwargs):
        verifies.append(args[0].shape)
        return verify(*args, **kwargs)

    monkeypatch.setattr(pass_ext.ops, "speculative_verify", spy)
    out = run(model, prompts, "pass", **kw)
    calls = len(verifies)
    monkeypatch.setenv("PASS_EXT_GREEDY_ROWS_MAX", "0")
    verifies.clear()
    ref = run(model, prompts, "pass", **kw)
    assert len(verifies) == ref.stats.forward_passes > 0            # the verify path: one op per step
    assert calls == (0 if one_call else len(verifies))
    assert torch.equal(out.sequences, ref.sequences)
    assert torch.equal(out.sequences, run(model, prompts, "ar", **kw).sequences)
    assert out.stats.accepted_length_histogram == ref.stats.accepted_length_histogram
    assert out.stats.forward_passes == ref.stats.forward_passes


@pytest.mark.parametrize("bad", ["-1", "many"])
@pytest.mark.parametrize("name, k", [("PASS_EXT_FUSED_HEAD_MAX_ROWS", 2), ("PASS_EXT_GREEDY_ROWS_MAX", 1)])
def test_fused_step_row_limits_must_be_row_counts(tiny, monkeypatch, name, k, bad):
    hf, model, _ = tiny
    monkeypatch.setenv(name, bad)
    with pytest.raises(ValueError, match=rf"{name} must be an integer in \[0, 1048576\]"):
        run(model, [[2, 3]], "pass", lookahead=k, max_new_tokens=4, eos_token_id=False)


def test_seed_reproducible_and_seed_sensitive(tiny):
    hf, model, _ = tiny
    kw = dict(max_new_tokens=20, eos_token_id=False, temperature=1.0)
    a = run(model, [[2, 3]] * 4, "pass", seed=7, **kw).sequences
    b = run(model, [[2, 3]] * 4, "pass", seed=7, **kw).sequences
    c = run(model, [[2, 3]] * 4, "pass", seed=8, **kw).sequences
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- bad requests

@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(method="beam"), ValueError, "method"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(lookahead=9), ValueError, "lookahead"),
    (dict(method="draft"), ValueError, "draft_model"),
    (dict(max_length=3), ValueError, "max_length"),
    (dict(temperature=[1.0, 0.5]), ValueError, "temperature"),
])
def test_bad_requests(tiny, kwargs, exc, words):
    hf, model, _ = tiny
    with pytest.raises(exc, match=words):
        pass_ext.generate(model, [[2, 3, 4]], **kwargs)


@pytest.mark.parametrize("ids, words", [([], "batch of zero"), ([[2], []], "empty"), ([[2, 99]], "vocabulary"),
                                        ([[2, -1]], "vocabulary"), ("hello", "ids")])
def test_bad_ids(tiny, ids, words):
    hf, model, _ = tiny
    with pytest.raises((ValueError, TypeError), match=words):
        pass_ext.generate(model, ids, method="ar")


def test_pass_without_lookahead_says_how_to_get_them():
    model = pass_ext.load_model(tiny_peaky_llama(seed=5), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="look-ahead embeddings"):
        pass_ext.generate(model, [[2, 3]], method="pass")


@pytest.mark.parametrize("prompts, behind", [([[2, 3], [4, 5, 6]], True), ([[2, 3], [4]], False)])
def test_draft_round_one_is_the_captured_step_when_prompts_allow(tiny, monkeypatch, prompts, behind):
    """With every prompt at least two tokens long the draft cache is prefilled one token short, so round one
    has the shape of every later round and needs no eager step (a CUDA graph replays from the first round);
    a one-token prompt keeps the eager first round. The draft cache then trails the target cache by one."""
    hf, model, draft = tiny
    import pass_ext.engine as E
    ref = pass_ext.generate(model, prompts, method="ar", max_new_tokens=9, eos_token_id=False)
    seen = {}
    run = E.run

    def spy(engine, c, *args, **kwargs):
        seen.update(eager=engine.first_step_eager, lens=engine.cache.lens.tolist(),
                    draft_lens=engine.draft_cache.lens.tolist())
        return run(engine, c, *args, **kwargs)

    monkeypatch.setattr(E, "run", spy)
    out = pass_ext.generate(model, prompts, method="draft", draft_model=draft, lookahead=3, max_new_tokens=9,
                            eos_token_id=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert seen["eager"] is (not behind)
    assert seen["lens"] == [len(p) - 1 for p in prompts]
    assert seen["draft_lens"] == [len(p) - (2 if behind else 1) for p in prompts]


def test_draft_model_with_other_vocabulary_is_refused(tiny):
    hf, model, _ = tiny
    other = pass_ext.load_model(tiny_peaky_llama(vocab=24, seed=4), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="vocabulary"):
        pass_ext.generate(model, [[2, 3]], method="draft", draft_model=other)


def test_generate_takes_a_transformers_model_and_converts_it_once():
    hf = tiny_peaky_llama(seed=9)
    a = pass_ext.generate(hf, [[2, 3, 4]], method="ar", max_new_tokens=8, eos_token_id=False)
    b = pass_ext.generate(hf, [[2, 3, 4]], method="ar", max_new_tokens=8, eos_token_id=False)
    assert torch.equal(a.sequences, b.sequences)
    from pass_ext.generate import _converted
    assert hf in _converted


# ---------------------------------------------------------------- when the host checks for the end

@pytest.mark.parametrize("method", ["ar"] + METHODS)
def test_a_step_never_emits_more_than_its_bound(tiny, monkeypatch, method):
    """stop_bound's premise: per step a row emits at most step_emits tokens. The draft method drafting with the
    target itself accepts every draft, so its steps reach the bound (the check can fail)."""
    from pass_ext import engine as E
    hf, model, draft = tiny
    k = 1 if method == "pass-tree" else 3
    cls = E.ENGINES[method]
    grown = []
    step = cls.step

    def counted(self, state):
        before = self.rows.n.clone()
        out = step(self, state)
        grown.append(int((self.rows.n - before).max()))
        return out

    monkeypatch.setattr(cls, "step", counted)
    run(model, [[2, 3, 4], [5]], method, model if method == "draft" else None, lookahead=None if method == "ar" else k,
        max_new_tokens=30, eos_token_id=False, cuda_graphs=False)
    assert grown and max(grown) <= cls.step_emits(k)
    if method == "draft":
        assert max(grown) == k + 1


def test_without_eos_the_host_checks_once_the_rows_can_be_done(tiny, monkeypatch):
    """No EOS and the default capacity: every row needs max_new_tokens, so plain decoding runs exactly that many
    steps (its first check), not the next multiple of sync_every; the same tokens either way."""
    hf, model, _ = tiny
    kw = dict(max_new_tokens=10, sync_every=4, cuda_graphs=False)
    bound = run(model, [[2, 3, 4]], "ar", eos_token_id=False, **kw)
    assert bound.stats.forward_passes == 10
    monkeypatch.setenv("PASS_EXT_STOP_BOUND", "0")
    grid = run(model, [[2, 3, 4]], "ar", eos_token_id=False, **kw)
    assert grid.stats.forward_passes == 12  # checks at 4, 8, 12
    assert grid.new_tokens[0].tolist() == bound.new_tokens[0].tolist()
    monkeypatch.delenv("PASS_EXT_STOP_BOUND")
    # A cache capacity of the caller's (rows may stop for length early) or EOS: checks from the first step.
    assert run(model, [[2, 3, 4]], "ar", eos_token_id=False, max_length=64, **kw).stats.forward_passes == 12


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and pass_ext.ops.has_cuda_kernels()),
                    reason="needs a CUDA GPU and the CUDA kernels")
@pytest.mark.parametrize("method", ["ar"] + METHODS)
def test_conditional_step_graph_checks_late_and_counts_what_ran(monkeypatch, method):
    """With EOS the captured step runs under an IF node and the host checks one check late: the same tokens and
    stop reasons as the plain graph, and the forwards counted are those that ran (plain decoding of one row: one
    per token, where the plain graph also counts the steps up to its check)."""
    from pass_ext import engine as E
    if not E.conditional_graphs_available():
        pytest.skip("this torch captures no conditional nodes")
    hf = tiny_peaky_llama()
    model = pass_ext.load_model(hf, dtype=torch.float32, device="cuda")
    model.lookahead = LookaheadEmbeddings.init(model, 4, seed=1)
    draft = pass_ext.load_model(tiny_peaky_llama(layers=1, seed=3), dtype=torch.float32, device="cuda")
    prompts = [[3, 4, 5], [6], [7, 8, 9, 10, 11, 12]]
    free = run(model, prompts, "ar", max_new_tokens=30, eos_token_id=False)
    eos = free.new_tokens[0][5].item()
    got = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("PASS_EXT_GRAPH_IF", flag)
        got[flag] = [run(model, prompts[:n], method, draft, lookahead=None if method == "ar" else 3, max_new_tokens=30,
                         eos_token_id=eos, sync_every=4) for n in (3, 1)]
    assert not E._GUARD_FAILED, E._GUARD_FAILED  # the IF graph was built, not fallen back from
    for a, b in zip(got["1"], got["0"]):
        assert [t.tolist() for t in a.new_tokens] == [t.tolist() for t in b.new_tokens]
        assert a.stats.stop_reasons == b.stats.stop_reasons
        assert a.stats.forward_passes <= b.stats.forward_passes
    if method == "ar":
        one = got["1"][1]
        assert one.stats.stop_reasons[0] == "eos" and one.stats.forward_passes == len(one.new_tokens[0])


@pytest.mark.cuda
@CUDA
def test_guarded_graph_runs_its_body_while_a_row_is_running():
    """ops.guarded_graph: the captured body runs at a launch only while some row of `done` is False (as the
    launch finds it), and `bodies` counts the runs; bad arguments are named."""
    from pass_ext import engine as E
    if not E.conditional_graphs_available():
        pytest.skip("this torch keeps no captured graph for editing")
    x = torch.zeros(4, device="cuda")
    done = torch.tensor([True, False, True], device="cuda")
    bodies = torch.zeros((), dtype=torch.long, device="cuda")
    body = torch.cuda.CUDAGraph(keep_graph=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body.capture_begin()
        x.add_(1)
        x[0].add_(done.sum())  # reads done inside the body too
        body.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    g = pass_ext.ops.guarded_graph(body, done, bodies)
    g.launch()
    g.launch()
    assert x.tolist() == [6, 2, 2, 2] and int(bodies) == 2
    done[1] = True
    for _ in range(3):
        g.launch()
    assert x.tolist() == [6, 2, 2, 2] and int(bodies) == 2
    done[0] = False
    g.launch()
    assert x.tolist() == [9, 3, 3, 3] and int(bodies) == 3
    with pytest.raises(RuntimeError, match="done must be a contiguous 1-d bool"):
        pass_ext.ops.guarded_graph(body, done.int(), bodies)
    with pytest.raises(RuntimeError, match="bodies must be one int64"):
        pass_ext.ops.guarded_graph(body, done, bodies.int())


def test_conditional_graphs_wanted_only_where_checks_start_at_once(monkeypatch):
    """The IF-node schedule is for calls checked from the first step (min_steps 0: EOS or a capacity of the
    caller's), never where PASS_EXT_GRAPH_IF=0 or after a failed build in this process."""
    from pass_ext import engine as E
    monkeypatch.setattr(E, "conditional_graphs_available", lambda: True)
    monkeypatch.delenv("PASS_EXT_GRAPH_IF", raising=False)
    assert E.conditional_graphs_wanted(0) and not E.conditional_graphs_wanted(12)
    monkeypatch.setenv("PASS_EXT_GRAPH_IF", "0")
    assert not E.conditional_graphs_wanted(0)
    monkeypatch.undo()
    monkeypatch.setattr(E, "_GUARD_FAILED", ["no conditional nodes"])
    assert not E.conditional_graphs_available() and not E.conditional_graphs_wanted(0)


def test_stop_bound():
    from pass_ext import engine as E
    assert E.stop_bound(E.ENGINES["ar"], 0, None, 64) == 64
    assert E.stop_bound(E.ENGINES["pass"], 4, None, 64) == 13       # 5 tokens a step
    assert E.stop_bound(E.ENGINES["pass-paper"], 4, None, 64) == 11  # 6
    assert E.stop_bound(E.ENGINES["draft"], 4, None, 64) == 13
    assert E.stop_bound(E.ENGINES["pass-tree"], 2, None, 64) == 22  # 3
    assert E.stop_bounded(eos=False, room=True)
    assert not E.stop_bounded(eos=True, room=True) and not E.stop_bounded(eos=False, room=False)


def test_eos_true_is_refused(tiny):
    hf, model, _ = tiny
    with pytest.raises(TypeError, match="eos_token_id"):
        pass_ext.generate(model, [[2, 3]], method="ar", eos_token_id=True)


# ---------------------------------------------------------------- CUDA graphs and lookahead="auto"

@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ar"] + METHODS)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("prompts", [[[3, 4, 5], [6], [7, 8, 9, 10, 11, 12], [2, 2]],
                                     [[3, 4, 5], [6, 1], [7, 8, 9, 10, 11, 12], [2, 2]]])
def test_cuda_graph_replay_equals_eager(method, temperature, prompts):
    """A replayed step runs the same kernels on the same RNG offsets as the eager step: same tokens. (The
    draft method replays from round one when no prompt is a single token, from round two otherwise.)"""
    model = pass_ext.load_model(tiny_peaky_llama(), dtype=torch.float32, device="cuda")
    model.lookahead = LookaheadEmbeddings.init(model, 4, seed=1)
    draft = pass_ext.load_model(tiny_peaky_llama(layers=1, seed=3), dtype=torch.float32, device="cuda")
    kw = dict(lookahead=3 if method != "ar" else None, max_new_tokens=37, temperature=temperature, top_k=8,
              seed=11, eos_token_id=False)
    eager = run(model, prompts, method, draft, cuda_graphs=False, **kw)
    graphed = run(model, prompts, method, draft, cuda_graphs=True, **kw)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert graphed.stats.accepted_length_histogram == eager.stats.accepted_length_histogram
    assert graphed.stats.forward_passes == eager.stats.forward_passes
    assert graphed.stats.draft_forward_passes == eager.stats.draft_forward_passes


def test_cuda_graphs_refused_on_cpu():
    model = pass_ext.load_model(tiny_peaky_llama(), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="cuda_graphs"):
        pass_ext.generate(model, [[1, 2]], method="ar", cuda_graphs=True)
    with pytest.raises(TypeError, match="cuda_graphs"):
        pass_ext.generate(model, [[1, 2]], method="ar", cuda_graphs="yes")


@pytest.mark.parametrize("method", ["pass", "pass-paper"])
def test_auto_lookahead_is_lossless_and_measured(tiny, method):
    hf, model, _ = tiny
    model.__dict__.pop("step_costs", None)
    model.lookahead.meta.pop("acceptance", None)
    prompts = [[3, 4, 5], [6, 7]]
    ref = run(model, prompts, "ar", max_new_tokens=24, eos_token_id=False)
    out = run(model, prompts, method, lookahead="auto", max_new_tokens=24, eos_token_id=False)
    assert torch.equal(out.sequences, ref.sequences)
    assert 0 <= out.stats.k <= model.lookahead.k
    # The costs were measured once per bucket and kept on the model, every one a positive time.
    costs = model.step_costs
    assert costs and all(v > 0 for v in costs.values())
    assert {key[-1] for key in costs} >= {0, 1}
    if out.stats.k > 0:  # the call's acceptance was recorded for the next choice
        assert model.lookahead.meta["acceptance"]["greedy"]


def test_auto_lookahead_picks_plain_decoding_when_drafting_cannot_pay(tiny):
    """With step costs that make any k slower than plain decoding even at full acceptance, auto runs k = 0,
    and still returns plain decoding's tokens."""
    from pass_ext import autotune
    hf, model, _ = tiny
    prompts = [[3, 4, 5]]
    ctx = autotune.context_bucket(3 + 10 // 2)
    model.__dict__["step_costs"] = {("ar", 1, ctx, False, 0): 1.0}
    for k in range(1, 5):
        model.step_costs[("pass", 1, ctx, False, k)] = 10.0 * (k + 1)
    model.lookahead.meta["acceptance"] = {"greedy": [1.0] * 4}
    ref = run(model, prompts, "ar", max_new_tokens=10, eos_token_id=False)
    out = run(model, prompts, "pass", lookahead="auto", max_new_tokens=10, eos_token_id=False)
    assert out.stats.k == 0
    assert torch.equal(out.sequences, ref.sequences)
    model.__dict__.pop("step_costs")
    model.lookahead.meta.pop("acceptance")


def test_autotune_choice_and_running_acceptance():
    from pass_ext import autotune
    assert autotune.expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert autotune.expected_tokens([0.5], 3, base=2) == pytest.approx(2 + 0.5 + 0.25 + 0.125)
    costs = {0: 1.0, 1: 1.1, 2: 1.2, 4: 1.5}
    assert autotune.choose_k(costs, [0.9, 0.9, 0.9, 0.9], 1, 4) == 4      # 4.1/1.5 beats 2.71/1.2
    assert autotune.choose_k(costs, [0.05] * 4, 1, 4) == 0                 # drafts almost never land
    assert autotune.choose_k(costs, None, 1, 2) == 2                       # no estimate: largest k that can pay
    assert autotune.choose_k({0: 1.0, 1: 2.5}, None, 1, 1) == 0            # cannot pay even at full acceptance
    # hysteresis: a previous choice within 5% of the best stays (no new workspace and capture for a near-tie)
    near = {0: 1.0, 1: 1.0, 2: 1.0}
    assert autotune.choose_k(near, [0.4, 0.04], 1, 2) == 2                 # 1.416 vs 1.4: best is 2
    assert autotune.choose_k(near, [0.4, 0.04], 1, 2, previous=1) == 1     # within 5%: keep 1
    assert autotune.choose_k(near, [0.4, 0.04], 1, 2, previous=0) == 2     # 1.0 vs 1.416: switch

    # hysteresis never keeps a k that scores below plain decoding
    assert autotune.choose_k({0: 1.0, 1: 1.2}, [0.18], 1, 1) == 0              # 1.18/1.2 < 1
    assert autotune.choose_k({0: 1.0, 1: 1.2}, [0.18], 1, 1, previous=1) == 0  # within 5%, but below k = 0


def test_autotune_scores_whole_calls_with_the_batch_efficiency():
    """SmolLM2 at B = 8 on the H200: k = 1 steps cost 1.21x plain decoding's, rows averaged 1.30 tokens per
    step, but the batch ran until its slowest row (1.19) and the host stopped on a multiple of 4 steps: 56
    steps instead of 64, a 0.95x call. The per-step score picked k = 1; the call score must not."""
    from pass_ext import autotune
    assert autotune.call_steps(64, 1.0, 4) == 64
    assert autotune.call_steps(64, 1.3, 4) == 52          # 49.2 -> 50 -> 52
    assert autotune.call_steps(64, 1.19, 1) == 54
    assert autotune.call_steps(1, 3.0, 4) == 4
    costs = {0: 1.21e-3, 1: 1.46e-3}
    assert autotune.choose_k(costs, [0.30], 1, 1) == 1                           # per step: 1.30/1.21 > 1
    assert autotune.choose_k(costs, [0.30], 1, 1, new_tokens=64, sync_every=4) == 1  # 52 steps: still a win
    assert autotune.choose_k(costs, [0.30], 1, 1, new_tokens=64, sync_every=4, efficiency=0.6) == 0  # 56 steps
    # Without EOS the host first checks once no row can be left (engine.stop_bound): plain decoding runs exactly
    # its new tokens' steps, not the next multiple of sync_every, and stops counting against it.
    assert autotune.call_steps(30, 1.0, 4) == 32 and autotune.call_steps(30, 1.0, 4, min_steps=30) == 30
    assert autotune.call_steps(30, 1.3, 4, min_steps=15) == 24  # 23.1 -> 24, past the first check
    costs = {0: 1.0, 1: 1.08}
    assert autotune.choose_k(costs, [0.10], 1, 1, new_tokens=30, sync_every=4) == 1  # 28 x 1.08 against 32
    from pass_ext import engine as E
    first = lambda k: E.stop_bound(E.ENGINES["pass" if k else "ar"], k, None, 30)  # noqa: E731
    assert autotune.choose_k(costs, [0.10], 1, 1, new_tokens=30, sync_every=4, first_check=first) == 0  # against 30

    class M:
        pass
    model = M()
    assert autotune.efficiency_of(model, False, 8) == 1.0                  # nothing measured
    # rows: 64 tokens each in 49..54 forwards (mean 1.24 per step); the batch took 54: G = 1.185
    autotune.record_efficiency(model, False, 8, [64] * 4, [49, 50, 52, 54])
    mean = sum(64 / a for a in [49, 50, 52, 54]) / 4
    e = (64 / 54 - 1) / (mean - 1)
    assert autotune.efficiency_of(model, False, 8) == pytest.approx(e)
    assert autotune.efficiency_of(model, False, 32) == pytest.approx(e)    # the largest smaller batch measured
    assert autotune.efficiency_of(model, False, 4) == 1.0
    assert autotune.efficiency_of(model, True, 8) == 1.0                   # settings kept apart
    autotune.record_efficiency(model, False, 8, [64] * 2, [64, 64])        # no gain: says nothing
    assert autotune.efficiency_of(model, False, 8) == pytest.approx(e)
    autotune.record_efficiency(model, False, 8, [64, 64], [40, 40])        # every row alike: e = 1
    assert autotune.efficiency_of(model, False, 8) == pytest.approx(0.7 * e + 0.3)
    # paper mode: two forwards a step, base 2 tokens a step
    autotune.record_efficiency(model, False, 1, [60], [40], passes_per_step=2, base=2)
    assert autotune.efficiency_of(model, False, 1) == 1.0
    # trees keep their own: the chain's until a tree call is measured, then the tree's, and the chain's unmoved
    chain = autotune.efficiency_of(model, False, 8)
    assert autotune.efficiency_of(model, False, 8, kind="tree") == pytest.approx(chain)
    autotune.record_efficiency(model, False, 8, [64] * 2, [32, 40], kind="tree")
    tree_e = (64 / 40 - 1) / ((64 / 32 + 64 / 40) / 2 - 1)
    assert autotune.efficiency_of(model, False, 8, kind="tree") == pytest.approx(tree_e)
    assert autotune.efficiency_of(model, False, 16, kind="tree") == pytest.approx(tree_e)
    assert autotune.efficiency_of(model, False, 8) == pytest.approx(chain)
    assert autotune.efficiency_of(model, True, 8, kind="tree") == 1.0
    with pytest.raises(ValueError, match="kind must be one of"):
        autotune.efficiency_of(model, False, 8, kind="star")

    class LA:
        meta = {}
    autotune.record_acceptance(LA, False, [10, 10, 20])     # reached: 40, 30, 20 -> a = 0.75, 0.667
    assert LA.meta["acceptance"]["greedy"] == pytest.approx([0.75, 20 / 30])
    autotune.record_acceptance(LA, False, [40, 0, 0])       # a1 = 0, position 2 reached 0 times: kept
    assert LA.meta["acceptance"]["greedy"] == pytest.approx([0.7 * 0.75, 20 / 30])
    assert "sampled" not in LA.meta["acceptance"]


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ar"] + METHODS)
def test_workspace_reuse_replays_the_same_graph_and_resets_everything(method):
    """A second call with the same shapes reuses the buffers and the captured step: its output must not
    depend on the first call (new prompts, new seed, new sampling, new EOS)."""
    model = pass_ext.load_model(tiny_peaky_llama(), dtype=torch.float32, device="cuda")
    model.lookahead = LookaheadEmbeddings.init(model, 4, seed=1)
    draft = pass_ext.load_model(tiny_peaky_llama(layers=1, seed=3), dtype=torch.float32, device="cuda")
    kw = dict(lookahead=3 if method != "ar" else None, max_new_tokens=30)
    first = run(model, [[3, 4, 5], [6]], method, draft, temperature=0.9, top_k=8, seed=1, eos_token_id=[5], **kw)
    (ws,) = model.__dict__["_pass_ext_workspaces"].values()
    graph = ws.graph
    second_args = dict(temperature=[0.7, 1.1], top_k=[0, 5], seed=2, eos_token_id=[4], pad_token_id=9, **kw)
    second = run(model, [[7, 8], [9, 10, 11]], method, draft, **second_args)
    (again,) = model.__dict__["_pass_ext_workspaces"].values()
    assert again is ws and ws.graph is graph  # reused, not recaptured
    pass_ext.release_workspace(model)
    fresh = run(model, [[7, 8], [9, 10, 11]], method, draft, **second_args)
    assert torch.equal(second.sequences, fresh.sequences)
    assert second.stats.stop_reasons == fresh.stats.stop_reasons
    assert second.stats.accepted_length_histogram == fresh.stats.accepted_length_histogram
    assert second.stats.forward_passes == fresh.stats.forward_passes
    assert not torch.equal(first.sequences[:, :2], second.sequences[:, :2])


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["pass", "pass-paper", "pass-tree"])
def test_workspace_reuse_reads_lookahead_weights_changed_in_place(method):
    """Look-ahead embeddings changed in place between two calls (training resumed, say) keep the workspace, whose
    captured step reads its own copies of them: the second call must draft from the new weights, as a fresh
    workspace does."""
    model = pass_ext.load_model(tiny_peaky_llama(), dtype=torch.float32, device="cuda")
    model.lookahead = LookaheadEmbeddings.init(model, 4, seed=1)
    kw = dict(lookahead=2, max_new_tokens=40, eos_token_id=False, seed=0)
    prompts = [[3, 4, 5], [6, 7]]
    first = run(model, prompts, method, **kw)
    (ws,) = model.__dict__["_pass_ext_workspaces"].values()
    with torch.no_grad():
        model.lookahead.weight.copy_(LookaheadEmbeddings.init(model, 4, seed=5).weight)
    second = run(model, prompts, method, **kw)
    (again,) = model.__dict__["_pass_ext_workspaces"].values()
    assert again is ws
    blocks = again.engine.la_blocks
    weight = model.lookahead.weight.detach()
    assert blocks and all(torch.equal(block.cpu(), weight[index.cpu()].to(block.dtype)) for block, index in blocks)
    pass_ext.release_workspace(model)
    fresh = run(model, prompts, method, **kw)
    assert second.stats.accepted_length_histogram == fresh.stats.accepted_length_histogram
    assert torch.equal(second.sequences, first.sequences) and torch.equal(fresh.sequences, first.sequences)


@CUDA
@pytest.mark.cuda
def test_prompts_longer_than_one_kernel_call_prefill_in_chunks():
    """The CUDA attention kernel takes at most 128 new tokens per call: a 200-token prompt with the default
    prefill_chunk (512) is cut into kernel-sized pieces, and gives the same tokens as on the CPU."""
    hf = tiny_peaky_llama()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(2, 16, (200,), generator=g).tolist()
    outs = {}
    for dev in ("cpu", "cuda"):
        model = pass_ext.load_model(hf, dtype=torch.float32, device=dev)
        outs[dev] = run(model, [prompt, prompt[:150]], "ar", max_new_tokens=8, eos_token_id=False).sequences
    assert torch.equal(outs["cpu"], outs["cuda"])


def test_batched_prefill_matches_row_by_row(tiny):
    """All rows prefill together (shorter rows padded): the committed cache equals one row at a time, and
    the padding never shows in the output."""
    from pass_ext.generate import prefill
    hf, model, _ = tiny
    g = torch.Generator().manual_seed(9)
    rows = [torch.randint(2, 16, (n,), generator=g).tolist() for n in (1, 12, 5, 30)]
    together = model.new_cache(4, 64)
    c = prefill(model, together, rows, chunk=7)
    assert together.lens.tolist() == [0, 11, 4, 29] and c.tolist() == [r[-1] for r in rows]
    for b, r in enumerate(rows):
        alone = model.new_cache(1, 64)
        prefill(model, alone, [r], chunk=7)
        n = len(r) - 1
        for layer in range(len(model.layers)):
            torch.testing.assert_close(together.k[layer][b, :, :n], alone.k[layer][0, :, :n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(together.v[layer][b, :, :n], alone.v[layer][0, :, :n], rtol=1e-5, atol=1e-6)
    out = run(model, rows, "ar", max_new_tokens=6, eos_token_id=False)
    for b, r in enumerate(rows):
        assert out.new_tokens[b].tolist() == run(model, [r], "ar", max_new_tokens=6, eos_token_id=False).new_tokens[0].tolist()


def test_prefill_graph_lengths_and_switch(monkeypatch):
    """Chunks pad to a multiple of 16 tokens that fits the cache's room and the kernel's 128 rows, up to 4096 tokens
    over all rows (else they run eagerly); PASS_EXT_PREFILL_GRAPHS takes 0 or 1 and names itself otherwise."""
    G = importlib.import_module("pass_ext.generate")
    length = G.PrefillGraphs.length
    assert [length(q, 1000, 1) for q in (1, 15, 16, 17, 33, 64, 65, 128)] == [16, 16, 16, 32, 48, 64, 80, 128]
    assert length(100, 111, 1) is None and length(100, 112, 1) == 112 and length(5, 15, 1) is None
    assert length(129, 1000, 1) is None  # past the attention kernel's rows
    assert length(128, 1000, 32) == 128 and length(128, 1000, 33) is None and length(60, 1000, 64) == 64
    for raw, want in (("0", False), ("1", True)):
        monkeypatch.setenv("PASS_EXT_PREFILL_GRAPHS", raw)
        assert G.prefill_graphs_enabled() is want
    for bad in ("2", "yes"):
        monkeypatch.setenv("PASS_EXT_PREFILL_GRAPHS", bad)
        with pytest.raises(ValueError, match="PASS_EXT_PREFILL_GRAPHS must be 0 or 1"):
            G.prefill_graphs_enabled()


@CUDA
@pytest.mark.cuda
def test_prefill_graphs_write_what_eager_chunks_write(tiny):
    """Replayed prefill chunks (padded to a multiple of 16 tokens) commit the same lengths as eager chunks and the
    same K/V up to float32 rounding (another row count may take other cuBLAS kernels); a length's first chunk
    (eager on the graph's buffers) and its replays give the same bits; ragged rows, several chunks, a chunk
    padded past the longest row."""
    G = importlib.import_module("pass_ext.generate")
    hf, model, _ = tiny
    if model.device.type != "cuda":
        pytest.skip("CUDA graphs")
    g = torch.Generator().manual_seed(21)
    rows = [torch.randint(2, 16, (n,), generator=g).tolist() for n in (1, 12, 200, 37)]
    eager = model.new_cache(4, 256)
    c_eager = G.prefill(model, eager, rows, 128)
    graphs = G.PrefillGraphs()
    cache = model.new_cache(4, 256)  # a graph writes the cache it was captured on
    c_first = G.prefill(model, cache, rows, 128, graphs)
    assert [n for _, _, n in graphs.graphs] == [128, 80]  # 128 real tokens, then 71 padded to 80
    assert torch.equal(c_first, c_eager) and cache.lens.tolist() == eager.lens.tolist() == [0, 11, 199, 36]
    first = cache.store.clone()
    for b, n in enumerate(eager.lens.tolist()):
        torch.testing.assert_close(first[:, :, b, :, :n], eager.store[:, :, b, :, :n], rtol=1e-5, atol=1e-6)
    cache.reset()
    cache.store.zero_()
    G.prefill(model, cache, rows, 128, graphs)  # replays only
    assert len(graphs) == 2 and cache.lens.tolist() == eager.lens.tolist()
    for b, n in enumerate(eager.lens.tolist()):
        assert torch.equal(cache.store[:, :, b, :, :n], first[:, :, b, :, :n])
    other = [r[::-1][:30] for r in rows]  # new prompts through the same graphs
    eager.reset()
    cache.reset()
    G.prefill(model, eager, other, 128)
    G.prefill(model, cache, other, 128, graphs)
    assert cache.lens.tolist() == eager.lens.tolist() == [0, 11, 29, 29] and len(graphs) == 3  # a new length: 32
    for b, n in enumerate(eager.lens.tolist()):
        torch.testing.assert_close(cache.store[:, :, b, :, :n], eager.store[:, :, b, :, :n], rtol=1e-5, atol=1e-6)


@CUDA
@pytest.mark.cuda
def test_prefill_graph_capture_out_of_memory_runs_eagerly(tiny, monkeypatch):
    """A capture that runs out of GPU memory costs the graph, not the call: the chunk (already run eagerly) is
    committed once, the length runs eagerly from then on, and the cache holds what eager chunks write."""
    G = importlib.import_module("pass_ext.generate")
    hf, model, _ = tiny
    if model.device.type != "cuda":
        pytest.skip("CUDA graphs")
    rows = [[3, 4, 5, 6, 7, 8, 9], [5, 6, 7]]
    eager = model.new_cache(2, 64)
    G.prefill(model, eager, rows, 128)
    real = G.PrefillGraphs._chunk
    captures = []

    def chunk(*args):
        if torch.cuda.is_current_stream_capturing():
            captures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args)

    monkeypatch.setattr(G.PrefillGraphs, "_chunk", staticmethod(chunk))
    graphs = G.PrefillGraphs()
    cache = model.new_cache(2, 64)
    for _ in range(2):  # the failed capture, then the eager run of the same length
        cache.reset()
        G.prefill(model, cache, rows, 128, graphs)
        assert cache.lens.tolist() == eager.lens.tolist() == [6, 2]
        assert len(graphs) == 0 and [n for _, _, n in graphs.graphs] == [16] and len(captures) == 1
        for b, n in enumerate(eager.lens.tolist()):
            torch.testing.assert_close(cache.store[:, :, b, :, :n], eager.store[:, :, b, :, :n], rtol=1e-5, atol=1e-6)
    assert not torch.cuda.is_current_stream_capturing()


@CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ar", "pass", "draft"])
def test_generate_with_prefill_graphs_equals_eager_prefill(tiny, method, monkeypatch):
    """generate's output does not depend on how the prompt was prefilled (float32), the workspace keeps the
    captured chunks and the next call replays them; "draft" with the model drafting for itself keeps one graph per
    cache."""
    G = importlib.import_module("pass_ext.generate")
    hf, model, draft = tiny
    if model.device.type != "cuda":
        pytest.skip("CUDA graphs")
    draft = model if method == "draft" else None
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 16, (n,), generator=g).tolist() for n in (3, 150, 40)]
    kw = dict(lookahead=3, max_new_tokens=12, eos_token_id=False)
    G.release_workspace(model)  # earlier tests' workspaces on this model hold chunks of their own
    monkeypatch.setenv("PASS_EXT_PREFILL_GRAPHS", "0")
    want = run(model, prompts, method, draft, **kw)
    monkeypatch.setenv("PASS_EXT_PREFILL_GRAPHS", "1")
    outs = [run(model, prompts, method, draft, **kw) for _ in range(2)]
    kept = [ws for ws in model.__dict__["_pass_ext_workspaces"].values() if len(ws.prefill_graphs)]
    assert len(kept) == 1 and len(kept[0].prefill_graphs) == (4 if method == "draft" else 2)
    for out in outs:
        assert torch.equal(out.sequences, want.sequences), method
    G.release_workspace(model)


def test_workspaces_are_kept_least_recently_used_first(monkeypatch):
    """generate keeps PASS_EXT_WORKSPACES (default 4) workspaces per model, so calls alternating between shapes
    or settings replay their graphs; beyond the limit the least recently used one is dropped."""
    G = importlib.import_module("pass_ext.generate")  # the module (pass_ext.generate is the function)
    model = type("M", (), {})()
    monkeypatch.setattr(G, "_keep_budget", lambda ws: float("inf"))
    make = lambda key: G._Workspace(key, engine=None)  # noqa: E731
    for key in "abcd":
        G._keep_workspace(model, make(key))
    assert G._workspace(model, "a").key == "a"  # a is now the most recently used
    G._keep_workspace(model, make("e"))
    assert list(model.__dict__["_pass_ext_workspaces"]) == ["c", "d", "a", "e"] and G._workspace(model, "b") is None
    monkeypatch.setenv("PASS_EXT_WORKSPACES", "1")
    G._keep_workspace(model, make("f"))
    assert list(model.__dict__["_pass_ext_workspaces"]) == ["f"]
    G._drop_workspaces(model)
    assert "_pass_ext_workspaces" not in model.__dict__
    for bad in ("0", "two"):
        monkeypatch.setenv("PASS_EXT_WORKSPACES", bad)
        with pytest.raises(ValueError, match="PASS_EXT_WORKSPACES must be an integer >= 1"):
            G.max_workspaces()


def test_kept_workspaces_stay_within_the_memory_budget(monkeypatch):
    """Besides the newest, the kept workspaces' KV caches may take only the budget (a quarter of the GPU's
    memory): older ones are dropped first, and the newest is kept whatever its size."""
    G = importlib.import_module("pass_ext.generate")
    model = type("M", (), {})()
    monkeypatch.setattr(G, "_keep_budget", lambda ws: 100)

    def make(key, nbytes):
        ws = G._Workspace(key, engine=None)
        ws.cache_bytes = nbytes
        return ws
    G._keep_workspace(model, make("a", 60))
    G._keep_workspace(model, make("b", 30))
    G._keep_workspace(model, make("c", 500))  # a + b = 90 <= 100 besides the newest: all kept
    assert list(model.__dict__["_pass_ext_workspaces"]) == ["a", "b", "c"]
    G._keep_workspace(model, make("d", 10))  # besides d: 590 > 100, drop a (530), then b (500), then c
    assert list(model.__dict__["_pass_ext_workspaces"]) == ["d"]


# ---------------------------------------------------------------- the fused end of a step

def _advance_state(B, m, seed, eos, accepted, device):
    g = torch.Generator().manual_seed(seed)
    max_new = 7
    acc = torch.randint(0, m, (B,), generator=g)
    args = [torch.randint(0, 60, (B,), generator=g).int(),                 # cache lens
            torch.full((B, max_new + 1), 99, dtype=torch.long),           # out (last column: the dump)
            torch.randint(0, 6, (B,), generator=g),                        # tokens emitted so far
            torch.rand(B, generator=g) < 0.3,                              # done
            torch.zeros(B, dtype=torch.long),                              # reason
            torch.tensor([3, 4][:eos]) if eos else None,                   # EOS ids
            torch.zeros(B, dtype=torch.long), torch.zeros(m, dtype=torch.long),   # active forwards, histogram
            torch.randint(0, 5, (B, m), generator=g), acc + 1]             # tokens, count
    args.append(args[3].clone())                                           # done before the step
    args.append(acc if accepted else None)
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    return args + [max_new, 1, m, 64, True]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[CUDA, pytest.mark.cuda])])
def test_compiled_step_end_matches_eager(device):
    """The end of a step (count, commit, emit with EOS and max_new_tokens, capacity stop, parking) compiled by
    torch.compile, as CUDA steps run it, writes exactly what the eager code writes: one compiled copy per pattern
    (EOS ids or none, accepted counts or none, one row or more, one token or more), rows that are done, hit an EOS,
    fill up or pass the capacity."""
    from pass_ext import engine as E
    from pass_ext.model import _Fused
    fused = _Fused("advance_test", E._advance, key=E._ADVANCE.key)
    cases = [(1, 1, 0, False), (3, 4, 1, True)] if device == "cpu" else [
        (B, m, eos, acc) for B in (1, 5) for m in (1, 4) for eos in (0, 1, 2) for acc in (False, True)]
    for i, (B, m, eos, acc) in enumerate(cases):
        for seed in (i, i + 100):   # a second shape of the same pattern reuses its copy
            want = _advance_state(B + seed // 100, m, seed, eos, acc, device)
            got = _advance_state(B + seed // 100, m, seed, eos, acc, device)
            E._advance(*want)
            fused(*got)
            for a, b in zip(want, got):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b), (B, m, eos, acc, a, b)
    assert fused.copies and all(state == "ok" for _, state in fused.copies.values())


@CUDA
@pytest.mark.cuda
def test_compiled_chain_never_compiles_inside_a_capture():
    """A compiled chain whose arguments would miss its compiled graphs during a CUDA graph capture (here: compiled
    for a view, captured with a tensor of its own, which torch.compile guards on) runs eagerly in that capture,
    warned once, and the graph replays the right result; compiling there would break the capture."""
    from pass_ext.model import _Fused

    def double_plus_one(x):
        return x * 2 + 1

    fused = _Fused("capture_test", double_plus_one, key=lambda x: "one")
    base = torch.arange(8, device="cuda", dtype=torch.float32)
    assert torch.equal(fused(base[:4]), base[:4] * 2 + 1)                     # compiled for a view
    src = torch.arange(4, device="cuda", dtype=torch.float32) + 10               # not a view
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), pytest.warns(RuntimeWarning, match="would recompile inside a CUDA graph"):
        graph.capture_begin()
        try:
            out = fused(src)
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    src.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert out.tolist() == [3.0, 5.0, 7.0, 9.0]
    assert fused.copies["one"][1] == "ok"   # the compiled copy stays in use outside captures
