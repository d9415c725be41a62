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
  efficiency, measured per (batch size, setting) after every PaSS call (`record_efficiency`; 1 at B = 1), for
  chains and trees apart.
- For method="pass-tree" auto picks a draft tree, (depth, nodes) from TREE_CANDIDATES or plain decoding, the same
  way: E(tree) = 1 + the sum over its nodes of the probability that the node's path is accepted, under a rank
  profile (`rank_profile`: how likely the model's token is each rank of each look-ahead position's drafts),
  calibrated after every tree call on the depths it reached (`record_tree_acceptance`).
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch

from . import engine as E
from . import masks

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


def call_steps(new_tokens: int, tokens_per_step: float, sync_every: int = 1, min_steps: int = 0) -> int:
    """Steps a call runs to emit new_tokens at tokens_per_step: the host stops the loop at its first check at or
    after that, at `min_steps` (`engine.stop_bound`: without EOS, no row can end earlier) or on a multiple of
    sync_every past it."""
    steps = max(math.ceil(new_tokens / max(tokens_per_step, 1e-9) - 1e-9), 1)
    if steps <= min_steps:
        return min_steps
    return -(-steps // sync_every) * sync_every


def choose_k(costs: dict, acceptance: Optional[list], base: int, max_k: int, previous: Optional[int] = None,
             new_tokens: Optional[int] = None, sync_every: int = 1, efficiency: float = 1.0,
             first_check: Optional[Callable[[int], int]] = None) -> int:
    """argmax_k E(k) / cost(k) over the measured costs {k: seconds} (k = 0 costs plain decoding). Without
    an acceptance estimate, the largest k that could still win even if every draft were accepted.

    With `new_tokens`, a whole call is scored instead: tokens / (call_steps(new_tokens, E_batch(k),
    sync_every, first_check(k)) * cost(k)), E_batch(k) = base + efficiency * (E(k) - base) (see
    `record_efficiency`); first_check(k): the steps before the host's first stop check at k (`engine.stop_bound`,
    for calls without EOS: plain decoding then runs exactly new_tokens steps), or None: none.

    `previous` (the k chosen for the same bucket last time) stays unless the best scores more than HYSTERESIS
    better, or it scores below k = 0: the running acceptance moves a little after every call, and a new k means
    a new workspace and a new CUDA graph capture, which costs more than a near-tie in E(k)/cost(k) gains."""
    ar = costs.get(0)
    if acceptance is None:
        best = max((k for k in costs if k > 0 and k <= max_k and (k + base) / costs[k] > 1.0 / ar), default=0)
        return best
    score = _scores({k: c for k, c in costs.items() if k <= max_k},
                    lambda k: batch_tokens(acceptance, k, base, efficiency), new_tokens, sync_every, first_check)
    return _settle(score, max(score, key=lambda k: (score[k], -k)), previous, 0)


def _scores(costs: dict, gain, new_tokens: Optional[int], sync_every: int, first_check=None) -> dict:
    """Tokens per second of every option {option: seconds per step}, with gain(option) tokens per step: per step,
    or with `new_tokens` per whole call (`call_steps`, its first check at first_check(option) where given)."""
    if new_tokens is None:
        return {o: gain(o) / c for o, c in costs.items()}
    return {o: 1.0 / (call_steps(new_tokens, gain(o), sync_every, first_check(o) if first_check else 0) * c)
            for o, c in costs.items()}


def _settle(score: dict, best, previous, plain):
    """`previous` when it scores within HYSTERESIS of `best` and not below plain decoding (`plain`, its option):
    the hysteresis only spares near-ties between winners; else `best`."""
    if previous in score and score[previous] * (1 + HYSTERESIS) >= score[best] and (
            previous == plain or plain not in score or score[previous] >= score[plain]):
        return previous
    return best


# The batch efficiencies, per kind of draft: a chain of k look-ahead drafts, or a draft tree (its rows' accepted
# lengths spread differently, so a chain's stragglers say little about a tree's; bench/NOTES.md, sixteenth session:
# at B = 8 a tree auto sharing the chain's efficiency picked one node where three ran faster).
EFFICIENCY_TABLES = {"chain": "auto_efficiency", "tree": "auto_tree_efficiency"}


def _efficiency_table(kind: str) -> str:
    if kind not in EFFICIENCY_TABLES:
        raise ValueError(f"kind must be one of {sorted(EFFICIENCY_TABLES)}, got {kind!r}")
    return EFFICIENCY_TABLES[kind]


def record_efficiency(model, sampled: bool, batch: int, new_tokens: list, active_forwards: list,
                      passes_per_step: int = 1, base: int = 1, min_gain: float = 0.05, kind: str = "chain") -> None:
    """Fold one PaSS call into the batch efficiency e of (setting, batch). Per step (passes_per_step
    forwards), the batch got G = max_b tokens_b / max_b steps_b (it ran until its slowest row was done); the
    acceptance predicts the mean over rows, E = mean_b tokens_b / steps_b; e = (G - base) / (E - base),
    clipped to [0, 1] (base: the tokens a step yields with no draft accepted). Calls whose rows gained less
    than `min_gain` over base say nothing about e and are skipped. `kind`: 'chain' or 'tree', kept apart."""
    name = _efficiency_table(kind)
    rows = [(n, a / passes_per_step) for n, a in zip(new_tokens, active_forwards) if a > 0]
    if not rows:
        return
    mean_gain = sum(n / a for n, a in rows) / len(rows)
    if mean_gain - base < min_gain:
        return
    batch_gain = max(n for n, _ in rows) / max(a for _, a in rows)
    e = min(max((batch_gain - base) / (mean_gain - base), 0.0), 1.0)
    table = model.__dict__.setdefault(name, {})
    key = (_setting(sampled), batch)
    table[key] = e if key not in table else (1 - EMA) * table[key] + EMA * e


def efficiency_of(model, sampled: bool, batch: int, kind: str = "chain") -> float:
    """The batch efficiency for (setting, batch) of this kind of draft: measured, else that of the largest smaller
    batch measured (stragglers only get worse with more rows); a tree with none measured takes the chain's (the
    best guess before its first call); else 1 (a single row is its own slowest row)."""
    table = model.__dict__.get(_efficiency_table(kind), {})
    setting = _setting(sampled)
    known = sorted(b for s, b in table if s == setting and b <= batch)
    if known:
        return table[(setting, known[-1])]
    return efficiency_of(model, sampled, batch) if kind == "tree" else 1.0


def context_bucket(n: int) -> int:
    """Contexts are timed at powers of two (attention cost grows slowly with the context length)."""
    return 1 << max(7, math.ceil(math.log2(max(n, 1))))


def step_costs(model, method: str, batch: int, context: int, sampled: bool, max_k: int) -> dict:
    """{k: seconds per decode step} for k in CANDIDATES up to max_k, measured once per bucket."""
    ctx = context_bucket(context)
    return {k: _measured(model, method, batch, ctx, sampled, k, k) for k in CANDIDATES if k <= max_k}


def _measured(model, method: str, batch: int, ctx: int, sampled: bool, k: int, option, tree=None) -> float:
    """Seconds per step of `method` at k (k = 0: plain decoding) for `option`, the table's last key field (k, or a
    tree's (depth, nodes)), measured once per bucket and kept in `model.step_costs`."""
    table = model.__dict__.setdefault("step_costs", {})
    key = ("ar", batch, ctx, sampled, 0) if k == 0 else (method, batch, ctx, sampled, option)
    if key not in table:
        table[key] = measure_step(model, key[0], batch, ctx, sampled, k, tree=tree)
    return table[key]


def scratch_step(model, method: str, batch: int, context: int, sampled: bool, k: int, steps: int,
                 tree: Optional[list] = None):
    """An engine of `method` at k (and `tree`, for pass-tree) on a scratch cache with `context` committed tokens per
    row (zeros: the cost of a step does not depend on them) and room for `steps` more steps; returns (engine, its
    first state, the cache). Call under torch.no_grad()."""
    dev = model.device
    engine_cls = E.ENGINES[method]
    per_step = engine_cls.step_tokens(k, tree) * engine_cls.passes_per_step
    capacity = context + per_step * steps + 1
    cache = model.new_cache(batch, capacity)
    cache.lens.fill_(context)
    temp = torch.full((batch,), 1.0 if sampled else 0.0, device=dev)
    sampling = E.Sampling(temp, torch.full((batch,), 10 if sampled else 0, dtype=torch.int32, device=dev),
                          torch.ones(batch, device=dev))
    rows = E.Rows(batch, capacity, [], 0, dev)
    stats = E.Stats(batch, k, dev)
    extra = dict(tree=tree) if method == "pass-tree" else {}
    eng = engine_cls(model, cache, sampling, E.Rng(0, dev), rows, stats, k=k, **extra)
    return eng, eng.start(torch.zeros(batch, dtype=torch.long, device=dev)), cache


def measure_step(model, method: str, batch: int, context: int, sampled: bool, k: int, reps: int = 8,
                 tree: Optional[list] = None) -> float:
    """Seconds per decode step of `method` at k (and `tree`, for pass-tree) on a scratch cache with `context`
    committed tokens per row (`scratch_step`). On CUDA the step is a replayed CUDA graph, as in generation."""
    with torch.no_grad():
        eng, state, _ = scratch_step(model, method, batch, context, sampled, k, reps + 4, tree)
        if model.device.type == "cuda":
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


# ---- draft trees (method="pass-tree") -------------------------------------------------------------------------

# (depth, nodes) of the draft trees lookahead="auto" weighs for method="pass-tree": steps of 4 to 24 rows per
# batch row ((nodes + 1) x (depth + 1)); up to 16 rows every projection runs as decode_linear.
TREE_CANDIDATES = ((1, 1), (1, 3), (1, 7), (2, 2), (2, 4), (3, 3), (2, 7))


def tree_options(max_k: int, max_rows: Optional[int] = None) -> list:
    """The (depth, nodes) candidates within the loaded look-ahead embeddings and a step's row limit."""
    return [(k, n) for k, n in TREE_CANDIDATES
            if k <= max_k and (max_rows is None or (n + 1) * (k + 1) <= max_rows)]


def _capped(row: list) -> list:
    """A rank row as probabilities: each in [0, 1], their sum at most 1."""
    row = [min(max(float(w), 0.0), 1.0) for w in row]
    total = sum(row)
    return [w / total for w in row] if total > 1.0 else row


def rank_profile(la, sampled: bool) -> list:
    """w[d][r], the probability that the model's token after an accepted path of depth d is the rank-r draft of
    LA_{d+1}: as calibrated by this model's tree calls (`record_tree_acceptance`) when there were any; else
    masks.RANK_PROFILE's shape scaled per depth to the measured top-1 acceptance (`acceptance_of`, whose
    position d is exactly w[d][0]); else masks.RANK_PROFILE."""
    stored = (la.meta.get("rank_profile") or {}).get(_setting(sampled))
    if stored:
        return [list(r) for r in stored]
    base = [list(r) for r in masks.RANK_PROFILE]
    acc = acceptance_of(la, sampled)
    if not acc:
        return base
    rows = []
    for d in range(max(len(base), len(acc))):
        row = base[min(d, len(base) - 1)]
        a = acc[d] if d < len(acc) else acc[-1]
        rows.append(_capped([w * a / row[0] for w in row]))
    return rows


def record_tree_acceptance(la, sampled: bool, paths: list, histogram: list) -> None:
    """Fold one tree call into the rank profile. histogram[d]: steps whose accepted path had depth d. Depth by
    depth, row d of the profile is scaled so that the tree's predicted share of steps reaching depth d + 1 (the
    sum of its depth-(d+1) paths' probabilities) matches the measured one, and the profile moves by EMA towards
    that. Depths the call reached fewer than _MIN_STEPS times, or where the tree has no nodes, are left alone."""
    k = len(histogram) - 1
    reached = [sum(histogram[i:]) for i in range(k + 1)]
    if k < 1 or reached[0] < _MIN_STEPS:
        return
    rows = rank_profile(la, sampled)
    rows += [list(rows[-1]) for _ in range(k - len(rows))]
    for d in range(k):
        if reached[d] < _MIN_STEPS:
            break
        predicted = sum(masks.path_probability(p, rows) for p in paths if len(p) == d + 1)
        if predicted <= 0.0:
            continue
        target = _capped([w * (reached[d + 1] / reached[0]) / predicted for w in rows[d]])
        rows[d] = [(1 - EMA) * w + EMA * t for w, t in zip(rows[d], target)]
    la.meta.setdefault("rank_profile", {})[_setting(sampled)] = rows


def tree_step_costs(model, batch: int, context: int, sampled: bool, options: list) -> dict:
    """{(depth, nodes): seconds per tree step} for the options, and (0, 0): plain decoding's step, measured once
    per bucket (a step's cost depends on the tree's shape, not on which ranks its nodes hold)."""
    ctx = context_bucket(context)
    return {(k, n): _measured(model, "pass-tree", batch, ctx, sampled, k, (k, n),
                              tree=masks.default_tree(k, n) if k else None) for k, n in [(0, 0)] + list(options)}


def choose_tree(costs: dict, profile: list, previous=None, new_tokens: Optional[int] = None, sync_every: int = 1,
                efficiency: float = 1.0, first_check: Optional[Callable[[tuple], int]] = None):
    """The (depth, nodes) of `costs` ((0, 0): plain decoding) with the most tokens per second: E(tree) under the
    profile, for the tree that option draws (`masks.default_tree(depth, nodes, profile)`), batch-adjusted and,
    with `new_tokens`, scored per whole call as in `choose_k`; `previous` stays unless another scores
    HYSTERESIS better (and it still beats plain decoding)."""
    def gain(opt):
        k, n = opt
        if k == 0:
            return 1.0
        return 1.0 + efficiency * (masks.expected_tree_tokens(masks.default_tree(k, n, profile), profile) - 1.0)
    score = _scores(costs, gain, new_tokens, sync_every, first_check)
    return _settle(score, max(score, key=lambda o: (score[o], -costs[o])), previous, (0, 0))
