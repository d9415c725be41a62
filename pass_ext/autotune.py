"""`lookahead="auto"`: pick the number of drafts k per batch (k = 0 is plain decoding) from measured
acceptance and measured step cost, so that PaSS is never slower than plain decoding at any batch size.

One step of PaSS at k costs c(B, k) and yields on average E(k) = base + sum_{i<=k} prod_{j<=i} a_j tokens per
row (a_j: the probability that draft j is accepted once drafts 1..j-1 were; base 1 for fused mode and plain
decoding, 2 for paper mode, whose drafting pass also emits a token). Auto picks argmax_k E(k) / c(B, k).

- Step cost is measured, not modelled: the first time a (method, batch, context) bucket is seen, each
  candidate k's real decode step runs on a scratch cache (as a CUDA graph on CUDA) and is timed. The table
  lives on the model (`model.step_costs`), so the calibration is paid once per bucket.
- Acceptance is measured too: every PaSS call updates a running average per position on the look-ahead
  embeddings (`lookahead.meta["acceptance"]`, greedy and sampled kept apart); the first guess comes from the
  acceptance measured when the embeddings were made, stored in the same field of their file.
- A batch finishes with its slowest row, and the host looks at the rows only every `sync_every` steps, so a
  call runs ceil_to(sync_every, max_new_tokens / E_batch) steps, not max_new_tokens / E(k): E_batch is the gain
  of the slowest row. Auto scores whole calls that way: E_batch(k) = base + e (E(k) - base), with e, the batch
  efficiency, measured per (batch size, setting) after every PaSS call (`record_efficiency`; 1 at B = 1).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Optional

import torch

from . import engine as E

CANDIDATES = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
EMA = 0.3          # weight of the newest call's acceptance in the running average
_MIN_STEPS = 8     # a call's acceptance counts once a position was reached this often


def expected_tokens(acceptance: list, k: int, base: int = 1) -> float:
    """base + sum_{i=1..k} prod_{j<=i} a_j; positions past the list reuse its last value (0 if empty)."""
    total, run = float(base), 1.0
    for i in range(k):
        a = acceptance[i] if i < len(acceptance) else (acceptance[-1] if acceptance else 0.0)
        run *= min(max(float(a), 0.0), 1.0)
        total += run
    return total


def _setting(sampled: bool) -> str:
    return "sampled" if sampled else "greedy"


def acceptance_of(la, sampled: bool) -> Optional[list]:
    """The running per-position acceptance for greedy or sampled rows, or None before any measurement."""
    acc = (la.meta.get("acceptance") or {}).get(_setting(sampled))
    return list(acc) if acc else None


def record_acceptance(la, sampled: bool, histogram: list) -> None:
    """Fold one call's accepted-length histogram (verify steps that accepted 0..k drafts) into the running
    per-position acceptance. Positions reached fewer than _MIN_STEPS times are left as they were."""
    k = len(histogram) - 1
    if k < 1:
        return
    reached = [sum(histogram[i:]) for i in range(k + 1)]
    store = la.meta.setdefault("acceptance", {})
    old = list(store.get(_setting(sampled)) or [])
    new = list(old)
    for i in range(1, k + 1):
        if reached[i - 1] < _MIN_STEPS:
            break
        a = reached[i] / reached[i - 1]
        if i - 1 < len(new):
            new[i - 1] = (1 - EMA) * new[i - 1] + EMA * a
        else:
            new.append(a)
    store[_setting(sampled)] = new


HYSTERESIS = 0.05  # keep the previous call's k unless another scores this much better


def base_tokens(method: str) -> int:
    """Tokens a PaSS step yields with no draft accepted: 2 in paper mode (its drafting pass emits one), else 1."""
    return 2 if method == "pass-paper" else 1


def batch_tokens(acceptance: list, k: int, base: int, efficiency: float = 1.0) -> float:
    """Expected tokens per step of a batch's slowest row at k: base + efficiency * (E(k) - base); 1 at k = 0."""
    return 1.0 if k == 0 else base + efficiency * (expected_tokens(acceptance, k, base) - base)


def call_steps(new_tokens: int, tokens_per_step: float, sync_every: int = 1) -> int:
    """Steps a call runs to emit new_tokens at tokens_per_step: the host stops the loop on a multiple of
    sync_every."""
    steps = math.ceil(new_tokens / max(tokens_per_step, 1e-9) - 1e-9)
    return -(-max(steps, 1) // sync_every) * sync_every


def choose_k(costs: dict, acceptance: Optional[list], base: int, max_k: int, previous: Optional[int] = None,
             new_tokens: Optional[int] = None, sync_every: int = 1, efficiency: float = 1.0) -> int:
    """argmax_k E(k) / cost(k) over the measured costs {k: seconds} (k = 0 costs plain decoding). Without
    an acceptance estimate, the largest k that could still win even if every draft were accepted.

    With `new_tokens`, a whole call is scored instead: tokens / (call_steps(new_tokens, E_batch(k),
    sync_every) * cost(k)), E_batch(k) = base + efficiency * (E(k) - base) (see `record_efficiency`).

    `previous` (the k chosen for the same bucket last time) stays unless the best scores more than HYSTERESIS
    better, or it scores below k = 0: the running acceptance moves a little after every call, and a new k means
    a new workspace and a new CUDA graph capture, which costs more than a near-tie in E(k)/cost(k) gains."""
    ar = costs.get(0)
    if acceptance is None:
        best = max((k for k in costs if k > 0 and k <= max_k and (k + base) / costs[k] > 1.0 / ar), default=0)
        return best
    def gain(k):
        return batch_tokens(acceptance, k, base, efficiency)
    if new_tokens is None:
        score = {k: gain(k) / c for k, c in costs.items() if k <= max_k}
    else:
        score = {k: 1.0 / (call_steps(new_tokens, gain(k), sync_every) * c) for k, c in costs.items() if k <= max_k}
    best = max(score, key=lambda k: (score[k], -k))
    # Never keep a k that scores below plain decoding: the hysteresis only spares near-ties between winners.
    if previous in score and score[previous] * (1 + HYSTERESIS) >= score[best] and (
            previous == 0 or 0 not in score or score[previous] >= score[0]):
        return previous
    return best


def record_efficiency(model, sampled: bool, batch: int, new_tokens: list, active_forwards: list,
                      passes_per_step: int = 1, base: int = 1, min_gain: float = 0.05) -> None:
    """Fold one PaSS call into the batch efficiency e of (setting, batch). Per step (passes_per_step
    forwards), the batch got G = max_b tokens_b / max_b steps_b (it ran until its slowest row was done); the
    acceptance predicts the mean over rows, E = mean_b tokens_b / steps_b; e = (G - base) / (E - base),
    clipped to [0, 1] (base: the tokens a step yields with no draft accepted). Calls whose rows gained less
    than `min_gain` over base say nothing about e and are skipped."""
    rows = [(n, a / passes_per_step) for n, a in zip(new_tokens, active_forwards) if a > 0]
    if not rows:
        return
    mean_gain = sum(n / a for n, a in rows) / len(rows)
    if mean_gain - base < min_gain:
        return
    batch_gain = max(n for n, _ in rows) / max(a for _, a in rows)
    e = min(max((batch_gain - base) / (mean_gain - base), 0.0), 1.0)
    table = model.__dict__.setdefault("auto_efficiency", {})
    key = (_setting(sampled), batch)
    table[key] = e if key not in table else (1 - EMA) * table[key] + EMA * e


def efficiency_of(model, sampled: bool, batch: int) -> float:
    """The batch efficiency for (setting, batch): measured, else that of the largest smaller batch measured
    (stragglers only get worse with more rows), else 1 (a single row is its own slowest row)."""
    table = model.__dict__.get("auto_efficiency", {})
    setting = _setting(sampled)
    known = sorted(b for s, b in table if s == setting and b <= batch)
    return table[(setting, known[-1])] if known else 1.0


def context_bucket(n: int) -> int:
    """Contexts are timed at powers of two (attention cost grows slowly with the context length)."""
    return 1 << max(7, math.ceil(math.log2(max(n, 1))))


def step_costs(model, method: str, batch: int, context: int, sampled: bool, max_k: int) -> dict:
    """{k: seconds per decode step} for k in CANDIDATES up to max_k, measured once per bucket."""
    table = model.__dict__.setdefault("step_costs", {})
    ctx = context_bucket(context)
    out = {}
    for k in CANDIDATES:
        if k > max_k:
            break
        key = ("ar" if k == 0 else method, batch, ctx, sampled, k)
        if key not in table:
            table[key] = measure_step(model, key[0], batch, ctx, sampled, k)
        out[k] = table[key]
    return out


def measure_step(model, method: str, batch: int, context: int, sampled: bool, k: int, reps: int = 8) -> float:
    """Seconds per decode step of `method` at k on a scratch cache with `context` committed tokens per row
    (the contents are zeros: the cost of a step does not depend on them). On CUDA the step is a replayed
    CUDA graph, as in generation."""
    dev = model.device
    engine_cls = E.ENGINES[method]
    per_step = engine_cls.step_tokens(k) * engine_cls.passes_per_step
    capacity = context + per_step * (reps + 4) + 1
    with torch.no_grad():
        cache = model.new_cache(batch, capacity)
        cache.lens.fill_(context)
        temp = torch.full((batch,), 1.0 if sampled else 0.0, device=dev)
        sampling = E.Sampling(temp, torch.full((batch,), 10 if sampled else 0, dtype=torch.int32, device=dev),
                              torch.ones(batch, device=dev))
        rows = E.Rows(batch, capacity, [], 0, dev)
        stats = E.Stats(batch, k, dev)
        eng = E.ENGINES[method](model, cache, sampling, E.Rng(0, dev), rows, stats, k=k)
        state = eng.start(torch.zeros(batch, dtype=torch.long, device=dev))
        if dev.type == "cuda":
            graph = E.StepGraph(eng, state)
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
        times = []
        for _ in range(max(2, reps // 4)):
            t0 = time.perf_counter()
            state = eng.step(state)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
