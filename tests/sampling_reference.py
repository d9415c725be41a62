"""Plain-PyTorch float64 references for the sampling ops, and the statistics the tests judge them with.

warp() states the rule the kernels implement (see csrc/kernels/sampling.cuh); chi_square_pvalue() compares
token counts with an exact distribution.
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch

import pass_ext.ops

F32_MAX = torch.finfo(torch.float32).max
F32_MIN = torch.finfo(torch.float32).tiny
HAS_CUDA = torch.cuda.is_available() and pass_ext.ops.has_cuda_kernels()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and the CUDA kernels")]),
]
# A statistical check fails when its chi-square p-value is below this, so each one fails by chance with this
# probability. Tests seeded from the OS (fresh_seed) run again on a new seed after such a failure (see
# statistical), which brings a chance failure of one test down to about P_FAIL ** 2.
P_FAIL = 1e-4


class ChanceFailure(AssertionError):
    """A chi-square check below P_FAIL: a wrong distribution, or (with probability P_FAIL) bad luck."""


def assert_follows(counts: torch.Tensor, probs: torch.Tensor, what: str = "counts") -> None:
    """Fails with ChanceFailure unless counts [C] fit the exact probabilities [C] (chi_square_pvalue > P_FAIL).
    Draws where probs is 0 fail with a plain AssertionError: no seed makes those right."""
    pvalue = chi_square_pvalue(counts, probs)
    if not pvalue > P_FAIL:
        expected = (probs.double().cpu().flatten() * counts.sum().item()).tolist()
        raise ChanceFailure(f"{what} {counts.tolist()} vs expected {[round(e, 1) for e in expected]}: "
                            f"chi-square p-value {pvalue:.2e}")


def statistical(test):
    """Runs a test that draws its inputs from fresh_seed() once more, on a new seed, when a chi-square check
    fails, and fails when the second run fails too. A distribution that is wrong by enough to fail once fails
    again (its p-values sit near 0 at these sample sizes); a chance failure repeats with probability P_FAIL.
    Any other assertion fails at once."""
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except ChanceFailure as first:
            print(f"chi-square check failed ({first}); running once more on a fresh seed")
            try:
                return test(*args, **kwargs)
            except ChanceFailure as second:
                raise second from first
    return wrapper


def fresh_seed() -> int:
    """Seeds torch from the OS and prints the seed (pytest shows it when the test fails)."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The warped distribution of one row of logits [V], float64 [V]."""
    l = logits.double().clone()
    l[torch.isnan(l)] = -math.inf
    vocab = l.numel()
    if not temperature > 0 or not bool((l > -math.inf).any()):
        p = torch.zeros_like(l)
        p[int(torch.argmax(l))] = 1.0  # first maximum; index 0 for an all -inf row
        return p
    inverse = max(1.0 / min(max(temperature, F32_MIN), F32_MAX), F32_MIN)  # the kernels' clamps
    z = torch.where(l > -math.inf, (l * inverse).clamp(-F32_MAX, F32_MAX), l)
    if 0 < top_k < vocab:
        kth = torch.topk(z, top_k).values[-1]
        z = torch.where(z >= kth, z, torch.full_like(z, -math.inf))
    p = torch.softmax(z, 0)
    if top_p < 1:  # NaN compares False: off
        order = torch.argsort(z, descending=True, stable=True)
        cum = torch.cumsum(p[order], 0)
        reached = torch.nonzero(cum >= top_p)
        m = int(reached[0]) if len(reached) else vocab - 1
        p = torch.where(z >= z[order[m]], p, torch.zeros_like(p))
        p = p / p.sum()
    return p


def warp_rows(logits: torch.Tensor, temperature, top_k, top_p) -> torch.Tensor:
    """warp() of every row of [N, V] with per-row parameter tensors, float64 [N, V] on the CPU."""
    return torch.stack([warp(logits[n].cpu(), float(temperature[n]), int(top_k[n]), float(top_p[n]))
                        for n in range(logits.shape[0])])


def warp_rows_matching(logits: torch.Tensor, temperature, top_k, top_p, probs: torch.Tensor,
                       slack: float = 1e-5) -> torch.Tensor:
    """warp_rows, except where a row's nucleus is ambiguous: when the cumulative sum crosses top_p within `slack`
    of it, summation order (fp32 in a kernel, float64 here) decides whether the boundary token is in, so such a
    row takes the reference cut at top_p - slack or top_p + slack instead if that is what `probs` (the kernel's
    [N, V]) holds. A nucleus wrong by more than `slack` of probability mass still fails."""
    ref = warp_rows(logits, temperature, top_k, top_p)
    got = probs.detach().double().cpu()
    for n in range(ref.shape[0]):
        p = float(top_p[n])
        if not p < 1 or torch.allclose(got[n], ref[n], atol=1e-6, rtol=1e-4):
            continue
        for cut in (p - slack, p + slack):
            alt = warp(logits[n].cpu(), float(temperature[n]), int(top_k[n]), cut)
            if torch.allclose(got[n], alt, atol=1e-6, rtol=1e-4):
                ref[n] = alt
                break
    return ref


def params(rows: int, temperature: float, top_k: int, top_p: float, device) -> tuple[torch.Tensor, ...]:
    return (torch.full((rows,), temperature, dtype=torch.float32, device=device),
            torch.full((rows,), top_k, dtype=torch.int32, device=device),
            torch.full((rows,), top_p, dtype=torch.float32, device=device))


def rng(seed: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([seed], dtype=torch.long, device=device),
            torch.tensor([offset], dtype=torch.long, device=device))


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts [C] under exact probabilities [C] (Pearson, cells with expectation < 5
    merged). Cells of probability 0 must be empty: a draw there is a hard failure, not a statistic."""
    counts, probs = counts.double().cpu().flatten(), probs.double().cpu().flatten()
    assert counts[probs <= 0].sum() == 0, f"draws outside the support: {counts[probs <= 0]}"
    n = counts.sum()
    counts, expected = counts[probs > 0], n * probs[probs > 0]
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum().reshape(1)])
        expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if len(counts) < 2:
        return 1.0
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(float(len(counts) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))
