"""sample: the warped distribution (probs_out) against a float64 reference, token frequencies against it,
greedy rows, edge cases, the RNG contract, and the op boundary. Same assertions on CPU and CUDA."""
import math

import pytest
import torch

from pass_ext import ops
from sampling_reference import (DEVICES, HAS_CUDA, assert_follows, fresh_seed, params, rng, statistical, warp_rows,
                                warp_rows_matching)

# (temperature, top_k, top_p) per row of a batch: plain, top-k, top-p, both, greedy.
CONFIGS = [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.3, 0, 0.9), (0.8, 10, 0.95), (0.0, 0, 1.0), (2.0, 3, 0.5)]


def run_sample(logits, temperature, top_k, top_p, seed=1, offset=0):
    device = logits.device
    out = torch.full((logits.shape[0],), -12345, dtype=torch.long, device=device)
    probs = torch.full(logits.shape, math.nan, dtype=torch.float32, device=device)
    s, o = rng(seed, offset, device)
    ops.sample(logits, temperature, top_k, top_p, s, o, out=out, probs_out=probs)
    return out, probs


def config_params(configs, device):
    t, k, p = zip(*configs)
    return (torch.tensor(t, dtype=torch.float32, device=device), torch.tensor(k, dtype=torch.int32, device=device),
            torch.tensor(p, dtype=torch.float32, device=device))


def draws_unchanged_by(monkeypatch, setting, logits, temperature, top_k, top_p, seed):
    """Samples at offsets 0..2 as set and again with `setting`=0 (a switch to the one-block passes): the same tokens
    and the same probabilities bit for bit (NaN where a row has none). Returns the draws as set, one per offset."""
    draws = []
    for offset in range(3):
        default = run_sample(logits, temperature, top_k, top_p, seed=seed, offset=offset)
        monkeypatch.setenv(setting, "0")
        other = run_sample(logits, temperature, top_k, top_p, seed=seed, offset=offset)
        monkeypatch.delenv(setting)
        assert torch.equal(default[0], other[0]), f"offset {offset}: {default[0].tolist()} != {other[0].tolist()}"
        assert torch.equal(default[1].nan_to_num(-1.0), other[1].nan_to_num(-1.0)), f"offset {offset}"
        draws.append(default)
    return draws


def assert_probs_match(logits, temperature, top_k, top_p, probs, out):
    ref = warp_rows_matching(logits.float(), temperature, top_k, top_p, probs)
    torch.testing.assert_close(probs.cpu().double(), ref, atol=1e-6, rtol=1e-4)
    drawn = ref[torch.arange(len(out)), out.cpu()]
    assert (drawn > 0).all(), f"tokens drawn outside the support: {out.tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [7, 1001, 49152, 151936])
def test_probs_match_reference(device, dtype, vocab):
    fresh_seed()
    rows = len(CONFIGS)
    logits = (torch.randn(rows, vocab) * 3).to(dtype).to(device)
    temperature, top_k, top_p = config_params(CONFIGS, device)
    out, probs = run_sample(logits, temperature, top_k, top_p)
    assert_probs_match(logits, temperature, top_k, top_p, probs, out)
    assert out[4] == logits[4].float().argmax()


def test_reference_tolerates_only_an_ambiguous_nucleus():
    """warp_rows_matching accepts either side of a top-p cut that a cumulative sum meets within its slack (the
    kernels sum in fp32), and nothing further off."""
    probs = torch.tensor([0.5, 0.4, 0.05, 0.05], dtype=torch.float64)
    logits = probs.log().float()[None]
    t, k, p = (torch.tensor([1.0]), torch.tensor([0], dtype=torch.int32), torch.tensor([0.9]))
    two = torch.tensor([[0.5, 0.4, 0, 0]], dtype=torch.float64) / 0.9  # the cut right at 0.9 ...
    four = probs[None].clone()                                          # ... or just past it
    for got in (two, four):
        torch.testing.assert_close(warp_rows_matching(logits, t, k, p, got), got, atol=1e-6, rtol=1e-4)
    one = torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64)  # a nucleus short by 0.4 of mass
    with pytest.raises(AssertionError):
        torch.testing.assert_close(warp_rows_matching(logits, t, k, p, one), one, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_at_the_thresholds_are_kept(device):
    fresh_seed()
    # Integer logits: many exact ties at the k-th value and at the top-p cut.
    logits = torch.randint(0, 5, (8, 33)).float().to(device)
    configs = [(1.0, 3, 1.0), (1.0, 1, 1.0), (0.5, 7, 1.0), (1.0, 0, 0.55), (1.0, 5, 0.7), (0.9, 0, 0.3),
               (1.0, 32, 1.0), (0.0, 0, 1.0)]
    temperature, top_k, top_p = config_params(configs, device)
    out, probs = run_sample(logits, temperature, top_k, top_p)
    assert_probs_match(logits, temperature, top_k, top_p, probs, out)
    kth = torch.topk(logits[0], 3).values[-1]
    assert ((probs[0] > 0) == (logits[0] >= kth)).all()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_first_argmax(device):
    fresh_seed()
    logits = torch.randint(-3, 3, (16, 50)).float()  # ties: the lowest index must win
    logits[3, 7] = math.nan
    logits[4, :] = -math.inf
    logits[5, :] = math.nan
    logits[6, 11] = math.inf
    logits = logits.to(device)
    # T = 0, negative and NaN temperatures are all greedy.
    temperature = torch.tensor([0.0, -1.0, math.nan, 0.0] * 4, device=device)
    top_k = torch.randint(0, 60, (16,), dtype=torch.int32, device=device)
    top_p = torch.rand(16, device=device)
    out, probs = run_sample(logits, temperature, top_k, top_p)
    expected = first_argmax(logits)
    assert torch.equal(out.cpu(), expected)
    assert out[4] == 0 and out[5] == 0 and out[6] == 11
    assert torch.equal(probs.cpu(), torch.nn.functional.one_hot(expected, 50).float())


def greedy_edge_rows(vocab: int) -> torch.Tensor:
    """Rows over several 4096-token chunks whose argmax hides in the corners of the chunk filter's greedy path:
    ties within and across threads and loads, NaN (counts as -inf), rows of only -inf and NaN, signed zeros,
    subnormals (the build flushes them in float arithmetic), infinities, the last token of a ragged chunk."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(14, vocab, generator=g, dtype=torch.float64) - 4
    rows[0] = torch.randint(-3, 3, (vocab,), generator=g).double()  # ties everywhere: the first 2 wins
    rows[1, :] = -math.inf
    rows[1, 4096:4099] = math.nan  # only -inf and NaN: token 0
    rows[2, :] = math.nan
    rows[3, 7000] = rows[3, 9000] = math.inf
    rows[4, 5000], rows[4, 4200] = 0.0, -0.0  # -0.0 ties +0.0: the first zero
    rows[5, 4100], rows[5, 4099] = -0.0, 0.0
    rows[6, 4096 + 255 * 8 + 7] = rows[6, 4096 + 256 * 8] = 5.0  # the last of one thread's load, then the next's
    rows[7, vocab - 1] = 9.0  # the very last token, in the ragged last chunk
    rows[8, :] = math.nan
    rows[8, 4100] = -100.0
    rows[9, :] = -1.0
    rows[9, 4096 + 3], rows[9, 4096 + 2000] = 2e-39, 3e-39  # subnormal in float32: the larger one
    rows[10, :] = -1.0
    rows[10, 5000], rows[10, 4500] = 3e-39, 0.0  # a subnormal above zero
    rows[11, :] = -math.inf
    rows[11, 4300] = -1e30
    rows[12, 6000] = rows[12, 6001] = 3.0
    rows[13, 2 * 4096 + 5] = 1e4
    rows[13, 4096 + 17] = 1e4  # the same maximum in two chunks: the first
    return rows


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    clean = torch.nan_to_num(logits.double().cpu(), nan=-math.inf)
    return torch.tensor([int(torch.nonzero(r == r.max())[0]) for r in clean])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,offset", [(3 * 4096 + 64, 0), (3 * 4096 + 64, 1), (3 * 4096 + 65, 0)])
def test_greedy_chunks_take_the_first_argmax(dtype, vocab, offset):
    """Greedy sample and verify on rows of whole, 16-byte aligned chunks (16-byte loads), starting one element
    off (every chunk unaligned) and of an odd length (rows alternate alignment): the first argmax of the row,
    NaN as -inf, as torch.argmax after nan_to_num."""
    rows_cpu = greedy_edge_rows(vocab).to(dtype)
    storage = torch.empty(rows_cpu.numel() + offset, dtype=dtype, device="cuda")
    logits = storage[offset:].view(rows_cpu.shape)  # contiguous; offset 1 moves every row off 16 bytes
    logits.copy_(rows_cpu)
    rows = logits.shape[0]
    expected = first_argmax(logits)
    zeros = torch.zeros(rows, device="cuda")
    out, probs = run_sample(logits, zeros, torch.zeros(rows, dtype=torch.int32, device="cuda"),
                            torch.ones(rows, device="cuda"))
    assert out.cpu().tolist() == expected.tolist()
    assert torch.equal(probs.cpu(), torch.nn.functional.one_hot(expected, vocab).float())
    # Verify: rows in pairs as (draft position, bonus position); each draft is its position's argmax.
    target = logits.reshape(rows // 2, 2, vocab)
    drafts = expected.view(rows // 2, 2)[:, :1].cuda()
    out_tokens = torch.empty(rows // 2, 2, dtype=torch.long, device="cuda")
    accepted = torch.empty(rows // 2, dtype=torch.int32, device="cuda")
    s, o = rng(1, 0, "cuda")
    half = rows // 2
    ops.speculative_verify(target, drafts, None, zeros[:half], torch.zeros(half, dtype=torch.int32, device="cuda"),
                           torch.ones(half, device="cuda"), s, o, out_tokens, accepted)
    assert accepted.cpu().tolist() == [1] * half
    assert out_tokens.cpu().tolist() == expected.view(half, 2).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_signed_zeros_tie(device):
    """-0.0 and +0.0 are equal: greedy takes the first, top-k = 1 keeps both (ties kept), like torch."""
    logits = torch.tensor([[-0.0, 0.0, -1.0], [-1.0, 0.0, -0.0]], device=device)
    zeros = torch.zeros(2, device=device)
    out, _ = run_sample(logits, zeros, torch.zeros(2, dtype=torch.int32, device=device), torch.ones(2, device=device))
    assert out.cpu().tolist() == [0, 1]
    _, probs = run_sample(logits, torch.ones(2, device=device), torch.ones(2, dtype=torch.int32, device=device),
                          torch.ones(2, device=device))
    assert probs.cpu().tolist() == [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_rows_and_out_of_range_params(device):
    fresh_seed()
    vocab = 40
    logits = torch.randn(14, vocab) * 2
    logits[0, :] = -math.inf  # nothing finite: token 0
    logits[1, :] = math.nan
    logits[2, ::3] = math.nan  # NaN counts as -inf
    logits[3, [5, 9]] = math.inf  # +inf: the infinite tokens share the mass
    logits = logits.to(device)
    configs = [(1.0, 0, 1.0), (0.5, 5, 0.9), (1.0, 0, 1.0), (1.0, 0, 1.0),
               (1.0, -4, 1.0), (1.0, vocab, 1.0), (1.0, 10 ** 6, 1.0),  # top_k off
               (1.0, 0, 0.0), (1.0, 0, -2.0), (1.0, 0, 1e-9),  # top_p <= 0: only the maximum
               (1.0, 0, 7.0), (math.inf, 0, math.nan),  # top_p > 1 and NaN: off; T = inf: flat
               (1e-30, 0, 1.0), (1e-40, 0, 1.0)]  # z overflows: clamped, ties at the top share the mass
    temperature, top_k, top_p = config_params(configs, device)
    out, probs = run_sample(logits, temperature, top_k, top_p)
    assert out[0] == 0 and out[1] == 0 and probs[0, 0] == 1 and probs[1, 0] == 1
    assert out[3] in (5, 9)
    torch.testing.assert_close(probs[3, [5, 9]].cpu(), torch.tensor([0.5, 0.5]))
    assert_probs_match(logits, temperature, top_k, top_p, probs, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [(1.0, 0, 1.0), (0.6, 4, 1.0), (1.5, 0, 0.8), (1.0, 6, 0.9), (1.0, 3, 0.6)],
                         ids=["plain", "top_k", "top_p", "top_k_top_p", "ties"])
@statistical
def test_frequencies_match_warped_distribution(device, config):
    fresh_seed()
    vocab, rows, calls = 12, 4000, 25
    base = torch.randn(vocab) * 1.5
    if config[1] == 3:
        base = torch.tensor([2.0, 2, 1, 1, 1, 0, 0, -1, 3, 0.5, 0.5, 2])
    logits = base.expand(rows, vocab).contiguous().to(device)
    temperature, top_k, top_p = params(rows, *config, device)
    expected = warp_rows(base[None], temperature[:1], top_k[:1], top_p[:1])[0]
    counts = torch.zeros(vocab, dtype=torch.long)
    seed = int(torch.randint(0, 2 ** 62, ()))
    for call in range(calls):  # rows and offsets both index independent draws
        out, _ = run_sample(logits, temperature, top_k, top_p, seed=seed, offset=call)
        counts += torch.bincount(out.cpu(), minlength=vocab)
    assert_follows(counts, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_rng_contract(device):
    fresh_seed()
    rows, vocab = 64, 1000
    logits = torch.randn(rows, vocab, device=device)
    temperature, top_k, top_p = params(rows, 1.0, 0, 1.0, device)
    a, _ = run_sample(logits, temperature, top_k, top_p, seed=7, offset=3)
    b, _ = run_sample(logits, temperature, top_k, top_p, seed=7, offset=3)
    assert torch.equal(a, b), "same seed and offset must reproduce the draw"
    assert not torch.equal(a, run_sample(logits, temperature, top_k, top_p, seed=8, offset=3)[0])
    assert not torch.equal(a, run_sample(logits, temperature, top_k, top_p, seed=7, offset=4)[0])
    # A row's draw depends on (seed, offset, row index) and its logits only, not on the other rows.
    c, _ = run_sample(logits[:5].clone(), temperature[:5], top_k[:5], top_p[:5], seed=7, offset=3)
    assert torch.equal(a[:5], c)
    # The op reads the seed and offset tensors and leaves them unchanged.
    s, o = rng(7, 3, device)
    ops.sample(logits, temperature, top_k, top_p, s, o)
    assert int(s) == 7 and int(o) == 3


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_cuda_draw_the_same_tokens(dtype):
    fresh_seed()
    rows, vocab = 256, 32000
    logits = (torch.randn(rows, vocab) * 2).to(dtype)
    configs = [CONFIGS[i % len(CONFIGS)] for i in range(rows)]
    temperature, top_k, top_p = config_params(configs, "cpu")
    out_cpu, probs_cpu = run_sample(logits, temperature, top_k, top_p, seed=11, offset=5)
    out_gpu, probs_gpu = run_sample(logits.cuda(), temperature.cuda(), top_k.cuda(), top_p.cuda(), seed=11, offset=5)
    torch.testing.assert_close(probs_gpu.cpu(), probs_cpu, atol=1e-6, rtol=1e-4)
    # Same Philox numbers; only float rounding at near-ties may differ.
    assert (out_cpu == out_gpu.cpu()).float().mean() >= 0.99


def split_rows(rows, vocab, dtype):
    """Logits and parameters that take every branch of the split sampler: top-k at and around its limit (64),
    with and without top-p, greedy rows, LM-like peaked rows, integer rows (ties that overflow a chunk's
    candidates) and rows with -inf holes."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(rows, vocab, generator=g) * 2
    logits[1::5] = torch.randn(len(logits[1::5]), vocab, generator=g) * 6  # peaked
    logits[2::5] = torch.randint(-2, 3, (len(logits[2::5]), vocab), generator=g).float()  # ties
    logits[3::5][torch.rand(len(logits[3::5]), vocab, generator=g) < 0.5] = -math.inf
    configs = [(0.8, 50, 0.95), (1.0, 64, 1.0), (0.7, 65, 1.0), (1.0, 1, 1.0), (0.0, 0, 1.0), (1.3, 10, 0.5),
               (0.8, 0, 0.9), (2.0, 40, 1e-6)]
    temperature, top_k, top_p = config_params([configs[i % len(configs)] for i in range(rows)], "cpu")
    return logits.to(dtype), temperature, top_k, top_p


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("group", ["auto", "1", "2", "4", "8"])
@pytest.mark.parametrize("vocab", [5000, 12291, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rows_match_one_block_rows(monkeypatch, dtype, vocab, group):
    """The split path (a row spread over many blocks, top-k candidates) and the one-block passes over the row
    (PASS_EXT_SAMPLE_SPLIT=0) warp and draw identically: same probabilities bit for bit, same tokens; with one,
    two, four or eight chunks per filter block (PASS_EXT_SAMPLE_GROUP; V = 5000 and 12291 leave a partial group, the
    latter a last chunk of three tokens)."""
    logits, temperature, top_k, top_p = (t.cuda() for t in split_rows(40, vocab, dtype))
    monkeypatch.setenv("PASS_EXT_SAMPLE_GROUP", group)
    split = draws_unchanged_by(monkeypatch, "PASS_EXT_SAMPLE_SPLIT", logits, temperature, top_k, top_p, seed=5)[-1]
    assert not split[1].isnan().any()
    assert_probs_match(logits.cpu(), temperature.cpu(), top_k.cpu(), top_p.cpu(), split[1], split[0])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 4097, 151936])
@pytest.mark.parametrize("group", ["auto", "4"])
def test_plain_rows_on_the_grid_match_one_block_rows(monkeypatch, dtype, vocab, group):
    """Rows with top-k and top-p off (the API's defaults) add up their mass and race over the whole grid (integer
    atomics across blocks), and nucleus rows (top-k off, top-p on) take their threshold from their top candidates
    and that mass; PASS_EXT_SAMPLE_GRID=0 makes the one-block passes over the row instead: the same probabilities
    bit for bit and the same tokens, at several offsets. Mixed with greedy and top-k rows, a row of -inf (one-hot
    at 0), NaN holes, a peaked row, top_k/top_p values that mean off (>= V, < 0, > 1), LM-like rows whose nucleus
    is small (with a tie at the top, and top_p 0: the maximum only) and a flat row whose nucleus is not (the
    one-block passes); V = 4097 leaves a last chunk of one token. Also with four chunks per filter block
    (PASS_EXT_SAMPLE_GROUP=4), where nucleus rows take one floor per group."""
    monkeypatch.setenv("PASS_EXT_SAMPLE_GROUP", group)
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(18, vocab, generator=g) * 3
    logits[3] = -math.inf
    logits[5, ::2] = math.nan
    logits[7] = torch.randn(vocab, generator=g) * 12
    # LM-like rows for the nucleus configs below: a few tokens well above a long flat tail
    for r in range(12, 18):
        head = torch.randperm(vocab, generator=g)[:min(vocab, 40)]
        logits[r] = torch.randn(vocab, generator=g)
        logits[r, head] += 15 - torch.arange(len(head), dtype=torch.float32) * 0.3
    logits[17, :2] = logits[17].max()  # a tie at the top
    configs = [(1.0, 0, 1.0), (0.8, 0, 1.0), (0.0, 0, 1.0), (1.0, 0, 1.0), (0.5, 10, 1.0), (1.0, 0, 1.0),
               (1.2, 0, 0.9), (0.8, 0, 1.0), (2.0, vocab + 5, 1.0), (1e-3, 0, 1.0), (0.8, -3, 2.0), (3.0, 0, 1.0),
               (0.8, 0, 0.95), (1.0, 0, 0.5), (0.7, 0, 0.0), (1.0, 0, 0.99), (1.5, 0, 0.9), (0.9, 0, 0.7)]
    logits = logits.to(dtype).cuda()
    temperature, top_k, top_p = config_params(configs, "cuda")
    grid = draws_unchanged_by(monkeypatch, "PASS_EXT_SAMPLE_GRID", logits, temperature, top_k, top_p, seed=3)[-1]
    assert not grid[1].isnan().any()
    assert_probs_match(logits.cpu(), temperature.cpu(), top_k.cpu(), top_p.cpu(), grid[1], grid[0])


def edge_rows(rows, vocab, dtype):
    """Logits and top-k / nucleus parameters for the filter's per-token shortcuts (the largest and second largest
    logits stand for the keys): extreme and subnormal temperatures (1/T clamps, z overflows to FLT_MAX or
    underflows, so that distinct logits share one key), NaN and -inf holes, +inf, signed zeros and subnormal
    logits, integer ties, rows of -inf and of NaN, LM-like peaked rows; top-k from 1 to 64 and nucleus rows."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(rows, vocab, generator=g) * 3
    for r in range(rows):
        kind = r % 8
        if kind == 1:  # peaked
            logits[r] = torch.randn(vocab, generator=g) * 12
        elif kind == 2:  # ties
            logits[r] = torch.randint(-2, 3, (vocab,), generator=g).float()
        elif kind == 3:  # holes and infinities
            logits[r, torch.rand(vocab, generator=g) < 0.3] = -math.inf
            logits[r, torch.rand(vocab, generator=g) < 0.1] = math.nan
            logits[r, torch.randint(0, vocab, (3,), generator=g)] = math.inf
        elif kind == 4:  # zeros of both signs and subnormals around them
            logits[r] = torch.randn(vocab, generator=g) * 1e-39
            logits[r, ::7] = 0.0
            logits[r, 3::7] = -0.0
        elif kind == 5:
            logits[r] = -math.inf if r % 16 == 5 else math.nan
        elif kind == 6:  # a few tokens well above a flat tail (nucleus rows)
            head = torch.randperm(vocab, generator=g)[:min(vocab, 30)]
            logits[r, head] += 12 - torch.arange(len(head), dtype=torch.float32) * 0.3
    configs = [(0.8, 50, 0.95), (1.0, 1, 1.0), (0.7, 64, 1.0), (1e-30, 10, 1.0), (1e30, 10, 0.9), (3e-39, 5, 1.0),
               (3.4e38, 20, 1.0), (0.8, 0, 0.9), (1.3, 17, 0.5), (0.8, 0, 0.95)]
    temperature, top_k, top_p = config_params([configs[(r * 3) % len(configs)] for r in range(rows)], "cpu")
    return logits.to(dtype), temperature, top_k, top_p


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("group", ["1", "8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [4099, 151936])
def test_edge_rows_match_one_block_rows(monkeypatch, dtype, vocab, group):
    """On edge_rows the split path (whose filter compares logits, not keys, where a thread's largest key is its
    own) and the one-block passes (PASS_EXT_SAMPLE_SPLIT=0) give the same probabilities bit for bit and the same
    tokens, at several offsets, and no token is drawn outside the support. V = 4099 puts odd rows off the 16-byte
    loads' alignment and leaves a last chunk of three tokens."""
    logits, temperature, top_k, top_p = (t.cuda() for t in edge_rows(40, vocab, dtype))
    monkeypatch.setenv("PASS_EXT_SAMPLE_GROUP", group)
    for split in draws_unchanged_by(monkeypatch, "PASS_EXT_SAMPLE_SPLIT", logits, temperature, top_k, top_p, seed=4):
        drawn = split[1][torch.arange(len(split[0]), device="cuda"), split[0]]
        assert (drawn > 0).all(), f"tokens drawn outside the support: {split[0].tolist()}"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("group", ["1", "4", "8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_rows_take_the_split_path(monkeypatch, dtype, group):
    """Top-k rows of V = 151936 (a last chunk of 384 tokens) are warped from the filter's candidates, not by the
    one-block passes over the row (their fallback). Both give the same draws (the tests above), so only the cost
    tells them apart: rows run side by side, so one row that falls back makes the call as slow as the passes
    (0.4-0.5 ms here), while the split path takes 0.03-0.15 ms (a fallback once went unnoticed because every test
    still passed). Medians of 15 calls each, a 2x margin."""
    logits = (torch.randn(8, 151936, device="cuda") * 3).to(dtype)
    temperature, top_k, top_p = config_params([(0.8, 50, 0.95), (1.0, 64, 1.0)] * 4, "cuda")
    monkeypatch.setenv("PASS_EXT_SAMPLE_GROUP", group)

    def median_ms():
        times = []
        for _ in range(15):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_sample(logits, temperature, top_k, top_p, seed=1, offset=0)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    median_ms()  # warm-up
    split = median_ms()
    monkeypatch.setenv("PASS_EXT_SAMPLE_SPLIT", "0")
    whole = median_ms()
    assert split * 2 < whole, f"split path {split:.3f} ms against {whole:.3f} ms for the one-block passes"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")
def test_filter_group_setting_is_checked(monkeypatch):
    """A PASS_EXT_SAMPLE_GROUP other than auto, 1, 2, 4 or 8 is an error that names it and its values."""
    logits, temperature, top_k, top_p = (t.cuda() for t in split_rows(2, 5000, torch.float32))
    monkeypatch.setenv("PASS_EXT_SAMPLE_GROUP", "3")
    with pytest.raises(RuntimeError, match="PASS_EXT_SAMPLE_GROUP must be auto, 1, 2, 4 or 8, got '3'"):
        run_sample(logits, temperature, top_k, top_p, seed=5, offset=9)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    logits = torch.randn(5, 37, device=device)
    temperature, top_k, top_p = config_params(CONFIGS[:5], device)
    s, o = rng(3, 9, device)
    out = torch.empty(5, dtype=torch.long, device=device)
    probs = torch.empty(5, 37, device=device)
    torch.library.opcheck(torch.ops.pass_ext.sample.default, (logits, temperature, top_k, top_p, s, o, out, probs))
    torch.library.opcheck(torch.ops.pass_ext.sample.default, (logits, temperature, top_k, top_p, s, o, out, None))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    rows, vocab = 3, 11
    logits = torch.randn(rows, vocab, device=device)
    temperature, top_k, top_p = params(rows, 1.0, 0, 1.0, device)
    s, o = rng(0, 0, device)
    out = torch.empty(rows, dtype=torch.long, device=device)
    good = dict(logits=logits, temperature=temperature, top_k=top_k, top_p=top_p, seed=s, offset=o, out=out,
                probs_out=None)
    bad = {
        "logits": [logits[0], logits.double(), torch.empty(rows, 0, device=device), logits.t()],
        "temperature": [temperature.double(), temperature[:2]],
        "top_k": [top_k.long()],
        "top_p": [top_p[None]],
        "seed": [s.int(), torch.zeros(2, dtype=torch.long, device=device)],
        "offset": [o.float()],
        "out": [out.int(), out[:2]],
        "probs_out": [torch.empty(rows, vocab, dtype=torch.float64, device=device),
                      torch.empty(rows, vocab + 1, device=device)],
    }
    for name, values in bad.items():
        for value in values:
            args = dict(good, **{name: value})
            with pytest.raises(RuntimeError, match=name):
                torch.ops.pass_ext.sample(*args.values())
