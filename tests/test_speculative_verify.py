"""speculative_verify: the emitted tokens are distributed as plain sampling from the warped target whatever
the drafts (statistically, against exact distributions), greedy rows match a reference exactly, the output
structure holds, and the op boundary checks its arguments. Same assertions on CPU and CUDA."""
import math

import pytest
import torch

from pass_ext import ops
from sampling_reference import (DEVICES, HAS_CUDA, assert_follows, fresh_seed, params, rng, statistical, warp,
                                warp_rows)


def run_verify(logits, drafts, draft_probs, temperature, top_k, top_p, seed=1, offset=0):
    batch, positions = logits.shape[:2]
    out = torch.full((batch, positions), 12345, dtype=torch.long, device=logits.device)
    accepted = torch.full((batch,), -7, dtype=torch.int32, device=logits.device)
    s, o = rng(seed, offset, logits.device)
    ops.speculative_verify(logits, drafts, draft_probs, temperature, top_k, top_p, s, o, out, accepted)
    return out, accepted


def assert_structure(out, accepted, drafts, vocab):
    out, accepted, drafts = out.cpu(), accepted.cpu(), drafts.cpu()
    k = drafts.shape[1]
    assert ((accepted >= 0) & (accepted <= k)).all()
    for b in range(out.shape[0]):
        a = int(accepted[b])
        assert torch.equal(out[b, :a], drafts[b, :a]), "the accepted prefix must be the drafts"
        assert 0 <= out[b, a] < vocab, "the correction or bonus token must be a token"
        assert (out[b, a + 1:] == -1).all(), "-1 after the stop"


def greedy_reference(logits, drafts):
    argmax = torch.nan_to_num(logits.double().cpu(), nan=-math.inf).argmax(-1)  # [B, k+1], first maximum
    drafts = drafts.cpu()
    batch, k = drafts.shape
    out = torch.full((batch, k + 1), -1, dtype=torch.long)
    accepted = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        a = 0
        while a < k and drafts[b, a] == argmax[b, a]:
            a += 1
        out[b, :a], out[b, a], accepted[b] = drafts[b, :a], argmax[b, a], a
    return out, accepted


def draft_from(q: torch.Tensor, rows: int) -> torch.Tensor:
    """rows independent drafts from each of the k distributions q [k, V] (torch's RNG): [rows, k]."""
    return torch.stack([torch.multinomial(qi, rows, replacement=True) for qi in q], dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_matches_reference(device, dtype):
    fresh_seed()
    batch, k, vocab = 64, 5, 1003
    logits = torch.randint(-4, 4, (batch, k + 1, vocab)).to(dtype)  # ties: the first maximum is the argmax
    logits[3, 2, 17] = math.nan
    drafts = logits.float().argmax(-1)[:, :k].clone()
    corrupt = torch.rand(batch, k) < 0.15
    drafts[corrupt] = torch.randint(-2, vocab + 2, (int(corrupt.sum()),))  # some out of range
    drafts[5] = -1
    drafts[6] = vocab
    temperature = torch.zeros(batch)
    temperature[::7] = -1.0  # negative temperature: greedy too
    top_k = torch.randint(0, 20, (batch,), dtype=torch.int32)
    top_p = torch.rand(batch)
    q = torch.rand(batch, k, vocab)  # ignored by greedy rows
    for draft_probs in (None, q):
        out, accepted = run_verify(logits.to(device), drafts.to(device),
                                   None if draft_probs is None else draft_probs.to(device),
                                   temperature.to(device), top_k.to(device), top_p.to(device))
        ref_out, ref_acc = greedy_reference(logits, drafts)
        assert torch.equal(out.cpu(), ref_out) and torch.equal(accepted.cpu(), ref_acc)


@pytest.mark.parametrize("device", DEVICES)
def test_structure_with_sampled_drafts(device):
    fresh_seed()
    batch, k, vocab = 24, 4, 151936
    logits = torch.randn(batch, k + 1, vocab, device=device) * 3
    temperature, top_k, top_p = params(batch, 0.8, 50, 0.95, device)
    temperature[::5] = 0.0
    # Drafts and their probabilities from sample on perturbed logits, as a drafter would make them.
    draft_logits = (logits[:, :k] + torch.randn(batch, k, vocab, device=device)).reshape(batch * k, vocab)
    q = torch.empty(batch * k, vocab, device=device)
    s, o = rng(5, 0, device)
    drafts = ops.sample(draft_logits, temperature.repeat_interleave(k), top_k.repeat_interleave(k),
                        top_p.repeat_interleave(k), s, o, probs_out=q).reshape(batch, k)
    out, accepted = run_verify(logits, drafts, q.reshape(batch, k, vocab), temperature, top_k, top_p, seed=5)
    assert_structure(out, accepted, drafts, vocab)
    ref = [warp(logits[b, int(accepted[b])].cpu(), float(temperature[b]), 50, 0.95) for b in range(batch)]
    assert all(ref[b][out[b, accepted[b]]] > 0 for b in range(batch)), "emitted tokens lie in the warped support"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [(1.0, 0, 1.0), (0.9, 6, 0.95), (1.3, 0, 0.7)], ids=["plain", "top_k_top_p", "top_p"])
@statistical
def test_emitted_tokens_follow_the_target(device, config):
    """First emitted token ~ warp(p_0) whatever q; given the first draft accepted, the second ~ warp(p_1);
    given all accepted, the bonus ~ warp(p_2); P(first accepted, token t) = min(p_0, q_0)(t)."""
    fresh_seed()
    batch, k, vocab = 30000, 2, 8
    base = torch.randn(k + 1, vocab) * 1.5
    p = torch.stack([warp(base[i], *config) for i in range(k + 1)])
    # Drafts put mass where the target has none, and none on some tokens the target likes.
    q = torch.distributions.Dirichlet(torch.full((vocab,), 0.7)).sample((k,)).double()
    q[:, int(p[0].argmax())] = 0.0
    q = q / q.sum(-1, keepdim=True)
    drafts = draft_from(q, batch)
    logits = base.expand(batch, k + 1, vocab).contiguous().to(device)
    temperature, top_k, top_p = params(batch, *config, device)
    out, accepted = run_verify(logits, drafts.to(device), q.float().expand(batch, k, vocab).contiguous().to(device),
                               temperature, top_k, top_p, seed=int(torch.randint(0, 2 ** 62, ())))
    out, accepted = out.cpu(), accepted.cpu()
    assert_structure(out[:200], accepted[:200], drafts[:200], vocab)

    first = torch.bincount(out[:, 0], minlength=vocab)
    assert_follows(first, p[0], "first token")

    # Joint of (first accepted?, first token, second token): cells (t, u) when the first draft is accepted,
    # plus one cell for "rejected".
    m = torch.minimum(p[0], q[0])
    joint = torch.cat([(m[:, None] * p[1][None, :]).flatten(), (1 - m.sum()).reshape(1)])
    hit = accepted >= 1
    cells = torch.cat([torch.bincount(out[hit, 0] * vocab + out[hit, 1], minlength=vocab * vocab),
                       (~hit).sum().reshape(1)])
    assert_follows(cells, joint, "(first accepted, first, second) cells")

    full = accepted == k
    bonus = torch.bincount(out[full, k], minlength=vocab)
    assert_follows(bonus, p[k], "bonus token")


@pytest.mark.parametrize("device", DEVICES)
@statistical
def test_one_hot_drafts_any_source(device):
    """draft_probs None on sampling rows: q is one-hot at the draft, so the first emitted token ~ warp(p_0)
    however the drafts were chosen (here: uniformly, and one fixed token)."""
    fresh_seed()
    batch, k, vocab = 20000, 1, 10
    base = torch.randn(k + 1, vocab)
    config = (0.8, 7, 0.9)
    p0 = warp(base[0], *config)
    drafts = torch.randint(0, vocab, (batch, k))
    drafts[: batch // 4] = int(p0.argmin())  # a token the target never emits
    logits = base.expand(batch, k + 1, vocab).contiguous().to(device)
    temperature, top_k, top_p = params(batch, *config, device)
    # the draws' seed comes from torch's, so @statistical's second run draws afresh, not the first run's uniforms
    out, accepted = run_verify(logits, drafts.to(device), None, temperature, top_k, top_p,
                               seed=int(torch.randint(0, 2 ** 62, ())), offset=9)
    counts = torch.bincount(out[:, 0].cpu(), minlength=vocab)
    assert_follows(counts, p0, "first token")


@pytest.mark.parametrize("device", DEVICES)
def test_drafts_from_the_target_are_always_accepted(device):
    """q equal to the warped target (sample's probs_out on the same logits): min(1, p/q) = 1 everywhere."""
    fresh_seed()
    batch, k, vocab = 32, 3, 4099
    logits = torch.randn(batch, k + 1, vocab, device=device) * 2
    temperature, top_k, top_p = params(batch, 0.7, 40, 0.9, device)
    flat = logits[:, :k].reshape(batch * k, vocab).contiguous()
    q = torch.empty(batch * k, vocab, device=device)
    s, o = rng(21, 0, device)
    drafts = ops.sample(flat, temperature.repeat_interleave(k), top_k.repeat_interleave(k),
                        top_p.repeat_interleave(k), s, o, probs_out=q).reshape(batch, k)
    out, accepted = run_verify(logits, drafts, q.reshape(batch, k, vocab), temperature, top_k, top_p)
    assert (accepted == k).all()
    assert_structure(out, accepted, drafts, vocab)


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_range_drafts_are_rejected(device):
    fresh_seed()
    batch, k, vocab = 16, 2, 50
    logits = torch.randn(batch, k + 1, vocab, device=device)
    drafts = torch.tensor([[-1, 3], [vocab, 0], [2 ** 40, 1], [-(2 ** 40), 2]] * 4, device=device)
    temperature, top_k, top_p = params(batch, 1.0, 0, 1.0, device)
    q = torch.full((batch, k, vocab), 1.0 / vocab, device=device)
    for draft_probs in (None, q):
        out, accepted = run_verify(logits, drafts, draft_probs, temperature, top_k, top_p)
        assert (accepted == 0).all()
        assert_structure(out, accepted, drafts, vocab)


@pytest.mark.parametrize("device", DEVICES)
def test_no_drafts_emits_the_bonus(device):
    fresh_seed()
    batch, vocab = 6, 100
    logits = torch.randn(batch, 1, vocab, device=device)
    temperature, top_k, top_p = params(batch, 1.0, 5, 1.0, device)
    temperature[0] = 0.0
    out, accepted = run_verify(logits, torch.empty(batch, 0, dtype=torch.long, device=device), None,
                               temperature, top_k, top_p)
    assert (accepted == 0).all() and out.shape == (batch, 1)
    assert out[0, 0] == logits[0, 0].argmax()
    ref = warp_rows(logits[:, 0].cpu(), temperature, top_k, top_p)
    assert (ref[torch.arange(batch), out[:, 0].cpu()] > 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_rng_contract(device):
    fresh_seed()
    batch, k, vocab = 64, 4, 500
    logits = torch.randn(batch, k + 1, vocab, device=device)
    drafts = torch.randint(0, vocab, (batch, k), device=device)
    q = torch.softmax(torch.randn(batch, k, vocab, device=device), -1)
    temperature, top_k, top_p = params(batch, 1.0, 0, 1.0, device)
    a = run_verify(logits, drafts, q, temperature, top_k, top_p, seed=4, offset=2)
    b = run_verify(logits, drafts, q, temperature, top_k, top_p, seed=4, offset=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], run_verify(logits, drafts, q, temperature, top_k, top_p, seed=5, offset=2)[0])
    assert not torch.equal(a[0], run_verify(logits, drafts, q, temperature, top_k, top_p, seed=4, offset=3)[0])
    c = run_verify(logits[:3].contiguous(), drafts[:3].contiguous(), q[:3].contiguous(), temperature[:3],
                   top_k[:3], top_p[:3], seed=4, offset=2)
    assert torch.equal(a[0][:3], c[0])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_cuda_agree(dtype):
    fresh_seed()
    batch, k, vocab = 128, 4, 32000
    logits = (torch.randn(batch, k + 1, vocab) * 2).to(dtype)
    temperature, top_k, top_p = params(batch, 0.8, 0, 0.9, "cpu")
    temperature[::4], top_k[1::4], top_p[2::4] = 0.0, 20, 1.0
    drafts = torch.randint(0, 50, (batch, k))
    drafts[::3] = logits.float().argmax(-1)[::3, :k]
    q = torch.softmax(torch.randn(batch, k, vocab) * 2, -1)
    a = run_verify(logits, drafts, q, temperature, top_k, top_p, seed=8, offset=1)
    b = run_verify(logits.cuda(), drafts.cuda(), q.cuda(), temperature.cuda(), top_k.cuda(), top_p.cuda(),
                   seed=8, offset=1)
    same = (a[0] == b[0].cpu()).all(-1) & (a[1] == b[1].cpu())
    assert same.float().mean() >= 0.99


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("group", ["auto", "1", "4", "8"])
def test_split_rows_match_one_block_rows(monkeypatch, dtype, with_probs, group):
    """Verify on split rows (candidates from many blocks, races over them) and on one-block rows
    (PASS_EXT_SAMPLE_SPLIT=0) returns the same tokens, draw for draw, with one, four or eight chunks per filter block
    (PASS_EXT_SAMPLE_GROUP)."""
    monkeypatch.setenv("PASS_EXT_SAMPLE_GROUP", group)
    from test_sample import split_rows
    batch, k, vocab = 24, 4, 151936
    logits, temperature, top_k, top_p = split_rows(batch * (k + 1), vocab, dtype)
    logits = logits.view(batch, k + 1, vocab).cuda()
    temperature, top_k, top_p = temperature[:batch].cuda(), top_k[:batch].cuda(), top_p[:batch].cuda()
    g = torch.Generator().manual_seed(4)
    drafts = logits.float().argmax(-1)[:, :k].cpu()
    noise = torch.rand(batch, k, generator=g) < 0.4
    drafts[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    drafts = drafts.cuda()
    q = torch.softmax(torch.randn(batch, k, vocab, generator=g) * 3, -1).cuda() if with_probs else None
    split = run_verify(logits, drafts, q, temperature, top_k, top_p, seed=6, offset=2)
    monkeypatch.setenv("PASS_EXT_SAMPLE_SPLIT", "0")
    whole = run_verify(logits, drafts, q, temperature, top_k, top_p, seed=6, offset=2)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[1], whole[1])
    assert_structure(*split, drafts, vocab)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("vocab", [33, 151936])
def test_plain_rows_on_the_grid_match_one_block_rows(monkeypatch, dtype, with_probs, vocab):
    """Rows with top-k and top-p off are warped from grid-wide sums and raced at the stop position over the whole
    grid (plain_stop_kernel), nucleus rows warped from their candidates and that sum; PASS_EXT_SAMPLE_GRID=0 makes
    one block warp and race over the row: the same tokens, draw for draw, at several offsets, with rejections at
    every position and bonus tokens. Mixed with greedy and top-k rows and a row of -inf; peaked rows accept their
    argmax drafts; with probs, some rows draft from the exact warped target (always accepted: the bonus)."""
    from test_sample import config_params
    batch, k = 16, 4
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(batch, k + 1, vocab, generator=g) * 3
    logits[::2] *= 10  # peaked: the argmax holds nearly all the mass, so argmax drafts reach the bonus
    logits[6] = -math.inf
    configs = [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.0, 0, 1.0), (1.0, 20, 1.0)] * 4
    configs[9] = (1.0, 0, 0.8)  # a flat nucleus: the one-block passes
    configs[10] = (0.9, 0, 0.9)  # peaked nucleus rows: the threshold from the candidates
    configs[14] = (1.0, 0, 0.5)
    temperature, top_k, top_p = config_params(configs, "cuda")
    logits = logits.to(dtype).cuda()
    drafts = logits.float().argmax(-1)[:, :k].cpu()
    noise = torch.rand(batch, k, generator=g) < 0.3
    noise[0] = noise[4] = False  # two peaked plain rows draft their argmax throughout
    drafts[noise] = torch.randint(0, vocab, (int(noise.sum()),), generator=g)
    drafts = drafts.cuda()
    q = None
    if with_probs:
        q = torch.softmax(torch.randn(batch, k, vocab, generator=g) * 3, -1).cuda()
        exact = torch.empty(batch * k, vocab, device="cuda")
        s, o = rng(1, 0, "cuda")
        ops.sample(logits[:, :k].reshape(batch * k, vocab), temperature.repeat_interleave(k),
                   top_k.repeat_interleave(k), top_p.repeat_interleave(k), s, o, probs_out=exact)
        q[::3] = exact.view(batch, k, vocab)[::3]
    plain = ((temperature > 0) & (top_k == 0) & (top_p >= 1)).cpu()
    stops = []
    for offset in range(4):
        grid = run_verify(logits, drafts, q, temperature, top_k, top_p, seed=6, offset=offset)
        monkeypatch.setenv("PASS_EXT_SAMPLE_GRID", "0")
        whole = run_verify(logits, drafts, q, temperature, top_k, top_p, seed=6, offset=offset)
        monkeypatch.delenv("PASS_EXT_SAMPLE_GRID")
        assert torch.equal(grid[1], whole[1]), f"offset {offset}: {grid[1].tolist()} != {whole[1].tolist()}"
        assert torch.equal(grid[0], whole[0]), f"offset {offset}"
        assert_structure(*grid, drafts, vocab)
        stops += grid[1].cpu()[plain].tolist()
    assert k in stops and min(stops) < k, f"plain rows should stop both before k and at k: {stops}"


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    batch, k, vocab = 3, 2, 29
    logits = torch.randn(batch, k + 1, vocab, device=device)
    drafts = torch.randint(0, vocab, (batch, k), device=device)
    q = torch.softmax(torch.randn(batch, k, vocab, device=device), -1)
    temperature, top_k, top_p = params(batch, 1.0, 5, 0.9, device)
    temperature[0] = 0.0
    s, o = rng(1, 2, device)
    out = torch.empty(batch, k + 1, dtype=torch.long, device=device)
    accepted = torch.empty(batch, dtype=torch.int32, device=device)
    for draft_probs in (q, None):
        torch.library.opcheck(torch.ops.pass_ext.speculative_verify.default,
                              (logits, drafts, draft_probs, temperature, top_k, top_p, s, o, out, accepted))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    batch, k, vocab = 2, 3, 13
    logits = torch.randn(batch, k + 1, vocab, device=device)
    drafts = torch.zeros(batch, k, dtype=torch.long, device=device)
    q = torch.full((batch, k, vocab), 1.0 / vocab, device=device)
    temperature, top_k, top_p = params(batch, 1.0, 0, 1.0, device)
    s, o = rng(0, 0, device)
    out = torch.empty(batch, k + 1, dtype=torch.long, device=device)
    accepted = torch.empty(batch, dtype=torch.int32, device=device)
    good = dict(target_logits=logits, draft_tokens=drafts, draft_probs=q, temperature=temperature, top_k=top_k,
                top_p=top_p, seed=s, offset=o, out_tokens=out, accepted=accepted)
    bad = {
        "target_logits": [logits[0], logits.double(), torch.randn(batch, 300, vocab, device=device)],
        "draft_tokens": [drafts.int(), drafts[:, :2], drafts[:1]],
        "draft_probs": [q.half(), q[:, :2], q[..., :5]],
        "temperature": [temperature[:1]],
        "top_k": [top_k.float()],
        "top_p": [top_p.half()],
        "seed": [s.float()],
        "offset": [torch.zeros(2, dtype=torch.long, device=device)],
        "out_tokens": [out[:, :k], out.int()],
        "accepted": [accepted.long(), accepted[:1]],
    }
    for name, values in bad.items():
        for value in values:
            args = dict(good, **{name: value})
            with pytest.raises(RuntimeError, match=name):
                torch.ops.pass_ext.speculative_verify(*args.values())
