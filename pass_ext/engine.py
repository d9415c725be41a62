"""The decode engine: plain AR (k = 0), PaSS in paper mode (two passes) and fused mode (one pass), and
classic draft-model speculative sampling — one loop, one cache, the same kernels for every method.

Every step works on device tensors only (forward, verify, commit, next inputs): the host looks at device
state every `sync_every` steps, to stream tokens and to stop. Shapes per step are fixed, so a step can be
captured as a CUDA graph.
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import masks, ops
from .model import _Fused, fusion_enabled


def fused_head_max_rows() -> int:
    """Rows of a fused PaSS forward (B x (k+1)^2) up to which its verify and draft logits come from one lm_head
    call: PASS_EXT_FUSED_HEAD_MAX_ROWS, default 256; 0 always makes two calls (the verify rows, then the
    chosen group). Read per step; the results are the same tokens either way up to near-ties."""
    return ops._env_int("PASS_EXT_FUSED_HEAD_MAX_ROWS", 256, 0, 1 << 20)


def chain_step_enabled() -> bool:
    """Whether a `pass-tree` step whose tree is a chain takes every token in one `sample` call
    (`TreePassEngine.chain_step`): PASS_EXT_TREE_CHAIN_STEP, '1' (default) or '0' (the general tree step; an A/B
    switch, read per step: a captured step keeps what it captured)."""
    return ops._env_on_off("PASS_EXT_TREE_CHAIN_STEP")


def greedy_rows_max() -> int:
    """Rows of a greedy fused PaSS step (B x (k+1)^2) up to which one argmax call over all of them replaces the
    verify op and the draft sample (`FusedPassEngine.greedy_step`): PASS_EXT_GREEDY_ROWS_MAX, default 128; 0 never.
    The argmax of rows no one reads costs less than the kernels it saves as far as measured: the k = 1 step on the
    random Qwen2.5-1.5B on an H200, 0.989x the time at B = 8 (32 rows) and 0.979x at B = 32 (128 rows) against the
    verify path (bench/NOTES.md); 256 rows are not measured. Read per step; the same tokens either way."""
    return ops._env_int("PASS_EXT_GREEDY_ROWS_MAX", 128, 0, 1 << 20)


# Stop reasons, stored per row on the device.
RUNNING, EOS, MAX_NEW, LENGTH = 0, 1, 2, 3
REASONS = {EOS: "eos", MAX_NEW: "max_new_tokens", LENGTH: "length"}


@dataclass
class Sampling:
    """Per-row warping on the device: temperature [B] float32 (0 = greedy), top_k [B] int32, top_p [B] float32."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor

    @property
    def greedy(self) -> bool:
        return bool((self.temperature == 0).all())

    def repeat(self, n: int) -> "Sampling":
        """Each row's parameters repeated n times (for n draft positions per row)."""
        return Sampling(*(t.repeat_interleave(n) for t in (self.temperature, self.top_k, self.top_p)))

    def copy_(self, other: "Sampling") -> None:
        """In place (a captured step reads these buffers): other's parameters, of the same shapes."""
        for dst, src in zip((self.temperature, self.top_k, self.top_p), (other.temperature, other.top_k, other.top_p)):
            dst.copy_(src)


class Rng:
    """Seed and offset as one-element device tensors: ops read them on the device, the engine advances
    the offset after each draw, so replays stay reproducible and a new seed changes the output."""

    def __init__(self, seed: int, device):
        self.seed = torch.tensor([seed], dtype=torch.long, device=device)
        self.offset = torch.zeros(1, dtype=torch.long, device=device)

    def advance(self) -> None:
        self.offset += 1


class Rows:
    """Device-side bookkeeping of the generated tokens of B rows: ragged counts, EOS, per-row stop."""

    def __init__(self, batch: int, max_new: int, eos_ids: list[int], pad_id: int, device):
        self.max_new = max_new
        self.out = torch.full((batch, max_new + 1), pad_id, dtype=torch.long, device=device)  # last col: dump
        self.n = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.reason = torch.zeros(batch, dtype=torch.long, device=device)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None

    def reset(self, pad_id: int, eos_ids: list[int]) -> None:
        """Ready for a new call with the same shapes (buffers kept: a captured step writes them)."""
        self.out.fill_(pad_id)
        self.n.zero_()
        self.done.zero_()
        self.reason.zero_()
        if self.eos is not None:
            self.eos.copy_(torch.tensor(eos_ids, dtype=torch.long))

    def stop_for_length(self, lens: torch.Tensor, q_next: int, capacity: int) -> None:
        """Rows whose next step would write at or past the cache capacity stop with reason "length"."""
        _stop_for_length(lens, self.done, self.reason, q_next, capacity)


def _emit_rows(out, n_out, done, reason, eos, max_new: int, tokens, count) -> None:
    """tokens [B, m] int64, the first count[b] valid: append them to each running row of `out`, up to and including
    an EOS and up to max_new tokens; in place (a captured step must write the buffers the next replay reads)."""
    m = tokens.shape[1]
    j = torch.arange(m, device=tokens.device)
    valid = j[None, :] < count[:, None]
    n = count.long()
    hit_eos = torch.zeros_like(done)
    if eos is not None:
        is_eos = torch.isin(tokens, eos) & valid
        first = torch.where(is_eos.any(1), is_eos.long().argmax(1), m)
        n = torch.minimum(n, first + 1)
    n = torch.minimum(n, max_new - n_out)
    n = torch.where(done, 0, n)
    if eos is not None:
        hit_eos = (first < n) & ~done
    cols = torch.where(j[None, :] < n[:, None], n_out[:, None] + j[None, :], max_new)
    out.scatter_(1, cols, tokens)
    n_out += n
    full = (n_out >= max_new) & ~done & ~hit_eos
    reason.copy_(torch.where(hit_eos, EOS, torch.where(full, MAX_NEW, reason)))
    done |= hit_eos | full


def _stop_for_length(lens, done, reason, q_next: int, capacity: int) -> None:
    over = ~done & (lens.long() + q_next > capacity)
    reason.masked_fill_(over, LENGTH)
    done |= over


def _advance(lens, out, n_out, done, reason, eos, active, hist, tokens, count, done_before, accepted,
             max_new: int, passes: int, q_next: int, capacity: int, check: bool) -> None:
    """The end of a step on the device, in place (`Engine.advance`): count the forward and the accepted drafts
    of the rows that ran, commit count[b] new tokens to the cache, emit them, and with `check` stop the rows whose
    next step would pass the capacity and park the finished ones (their cache length 0)."""
    ran = (~done_before).long()
    active += ran * passes
    if accepted is not None:
        # A one-hot sum, not index_add_: compiled, that became an accumulating index_put (a sort, bounds asserts
        # and about eight kernels a step).
        a = accepted.long().clamp(0, hist.shape[0] - 1)
        hist += ((a[:, None] == torch.arange(hist.shape[0], device=a.device)[None, :]).long() * ran[:, None]).sum(0)
    lens += torch.where(done_before, 0, count).to(torch.int32)
    _emit_rows(out, n_out, done, reason, eos, max_new, tokens, count)
    if check:
        _stop_for_length(lens, done, reason, q_next, capacity)
        lens.masked_fill_(done, 0)


def step_fusion_enabled() -> bool:
    """Whether CUDA steps run their ends (`_advance`: about 25 small kernels eagerly) as kernels generated by
    torch.compile: PASS_EXT_FUSE_STEP, default on, read per step (a captured step keeps what it captured); off
    too with PASS_EXT_FUSE=0."""
    return fusion_enabled() and os.environ.get("PASS_EXT_FUSE_STEP", "1") != "0"


# One compiled copy per pattern that torch.compile would specialise on (no EOS or some, no accepted counts or some,
# one row or more, one token or more): the methods of one process stay within each copy's recompile limit, however
# many shapes they run. Compiled on first use.
_ADVANCE = _Fused("advance", _advance, switch="PASS_EXT_FUSE_STEP", key=lambda *a: (
    None if a[5] is None else min(a[5].numel(), 2), a[11] is None, a[8].shape[0] == 1, a[8].shape[1] == 1))


class Stats:
    """Per-call counters, kept on the device until the end."""

    def __init__(self, batch: int, k: int, device):
        self.k = k
        self.hist = torch.zeros(k + 1, dtype=torch.long, device=device)
        self.active_forwards = torch.zeros(batch, dtype=torch.long, device=device)
        self.forward_passes = 0
        self.draft_forward_passes = 0

    def reset(self) -> None:
        self.hist.zero_()
        self.active_forwards.zero_()
        self.forward_passes = self.draft_forward_passes = 0

    def host_counters(self) -> tuple:
        return self.forward_passes, self.draft_forward_passes

    def add_host_counters(self, forward: int, draft: int) -> None:
        self.forward_passes += forward
        self.draft_forward_passes += draft


@dataclass
class StepState:
    """What one iteration hands to the next: the pending token c (sampled, not yet in the cache) and,
    for PaSS, the drafts for the tokens after it with the warped distributions they were drawn from."""
    c: torch.Tensor                              # [B] int64
    drafts: Optional[torch.Tensor] = None        # [B, k] int64
    draft_probs: Optional[torch.Tensor] = None   # [B, k, V] float32 (None when every row is greedy)


class Engine:
    """Runs one method over a prefilled batch. Subclassed per method by `step`."""

    passes_per_step = 1   # target forward passes per step
    first_step_eager = False  # the first step differs from the captured one: run it eagerly

    @staticmethod
    def step_tokens(k: int, tree=None) -> int:
        """New tokens per row that one step writes into the target cache (`q_step`), before an engine exists."""
        return 1

    @staticmethod
    def step_emits(k: int, tree=None) -> int:
        """The most tokens one step can emit per row (`run`'s bound on when a call can end)."""
        return 1

    def __init__(self, model, cache, sampling: Sampling, rng: Rng, rows: Rows, stats: Stats, k: int = 0):
        self.model, self.cache, self.sampling, self.rng, self.rows, self.stats = model, cache, sampling, rng, rows, stats
        self.k = k
        self.q_step = self.step_tokens(k)
        self.device = cache.lens.device
        # Cast and moved once: a step must not copy from the host (a captured step cannot).
        la = getattr(model, "lookahead", None)
        self.la_weight = None if la is None else la.weight.detach().to(self.device, model.dtype)
        self.la_blocks: list[tuple[torch.Tensor, torch.Tensor]] = []   # (block, index): see la_block

    # -- shared pieces -----------------------------------------------------------------------------
    def positions(self, offsets: torch.Tensor) -> torch.Tensor:
        """[B, Q] positions: each row's committed length plus per-token offsets [Q]."""
        return self.cache.lens.long()[:, None] + offsets[None, :]

    def sample(self, logits: torch.Tensor, sampling: Sampling, want_probs: bool):
        """logits [N, V] -> tokens [N] int64 and (warped probs [N, V] float32 or None)."""
        probs = torch.empty_like(logits, dtype=torch.float32) if want_probs else None
        tokens = ops.sample(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                            self.rng.seed, self.rng.offset, probs_out=probs)
        self.rng.advance()
        return tokens, probs

    def verify(self, target_logits, drafts, draft_probs):
        out, accepted = ops.speculative_verify(
            target_logits, drafts, draft_probs, self.sampling.temperature, self.sampling.top_k,
            self.sampling.top_p, self.rng.seed, self.rng.offset)
        self.rng.advance()
        return out, accepted

    def advance(self, tokens: torch.Tensor, count: torch.Tensor, done_before: torch.Tensor,
                accepted: Optional[torch.Tensor] = None, passes: int = 1, check: bool = True) -> None:
        """The end of a step: count `passes` forwards (and the accepted drafts) of the rows not done before it,
        commit and emit the first count[b] of tokens [B, m] per row, then (`check`) check the capacity for the next
        step (`check_capacity`, of the target cache only). On CUDA one compiled function (`step_fusion_enabled`),
        else the same math eagerly."""
        self.stats.forward_passes += passes
        r, st = self.rows, self.stats
        args = (self.cache.lens, r.out, r.n, r.done, r.reason, r.eos, st.active_forwards, st.hist, tokens, count,
                done_before, accepted, r.max_new, passes, self.q_step, self.cache.capacity, check)
        self.step_fn(_ADVANCE)(*args)

    def step_fn(self, chain: _Fused) -> Callable:
        """A step's compiled chain on CUDA (`step_fusion_enabled`), else its eager function."""
        return chain if self.device.type == "cuda" and step_fusion_enabled() else chain.fn

    def la_block(self, la_index: torch.Tensor) -> torch.Tensor:
        """[n, d]: the look-ahead embedding LA_{la_index[j]+1} in row j, gathered once (`reset` refreshes it in place:
        a captured step reads it)."""
        block = self.la_weight[la_index]
        self.la_blocks.append((block, la_index))
        return block

    def lookahead_embeds(self, ids: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        """Input vectors [B, Q + n] of a step: the embeddings of ids [B, Q], then the look-ahead rows `block` [n, d]
        (`la_block`). In every layout the look-ahead tokens follow the real ones, so this is one embedding lookup and
        one concatenation (an index_put on the embeddings took about ten small kernels)."""
        return torch.cat([self.model.embed(ids), block[None].expand(ids.shape[0], -1, -1)], 1)

    def match_step(self, hidden: torch.Tensor, sampling: Sampling, drafts: torch.Tensor, groups: torch.Tensor,
                   done: torch.Tensor) -> StepState:
        """The rest of a one-pass step over a chain of N drafts [B, N] (rows [c, d_1..d_N], then look-ahead groups)
        with every row's logits in one lm_head call: one `sample` call over all B x Q rows (`sampling` per row), the
        accepted drafts the leading ones equal to the token sampled after their prefix, rows 0..N emitted up to the
        first mismatch, and the next drafts the tokens at the rows groups[accepted] (`groups` [N+1, N])."""
        B, Q = hidden.shape[0], hidden.shape[1]
        logits = self.model.lm_head_logits(hidden)                                          # [B, Q, V]
        t, _ = self.sample(logits.view(B * Q, -1), sampling, want_probs=False)
        t = t.view(B, Q)
        accepted, count, nxt, nxt_drafts = self.step_fn(_GREEDY_VERIFIED)(t, drafts, groups)
        self.advance(t[:, : drafts.shape[1] + 1], count, done, accepted)
        return StepState(c=nxt, drafts=nxt_drafts)

    def check_capacity(self) -> None:
        """Before a step: rows whose writes would pass the capacity stop ("length"); then park done rows."""
        self.rows.stop_for_length(self.cache.lens, self.q_step, self.cache.capacity)
        self.park_done_rows()

    def park_done_rows(self) -> None:
        """Finished rows keep riding along (fixed shapes) but see an empty cache: their writes stay in
        the first slots, far from the capacity, and their attention costs nothing."""
        self.cache.lens.masked_fill_(self.rows.done, 0)

    def start(self, c: torch.Tensor) -> StepState:
        """The first state after prefill (c = each row's last prompt token, not yet in the cache)."""
        return StepState(c=c)

    def reset(self) -> None:
        """Ready for a new call on the same buffers (the caller refilled cache, sampling, rng, rows, stats)."""
        la = getattr(self.model, "lookahead", None)
        if self.la_weight is not None and la is not None:
            self.la_weight.copy_(la.weight.detach())
            for block, index in self.la_blocks:
                block.copy_(self.la_weight[index])

    def step(self, state: StepState) -> StepState:
        raise NotImplementedError


class AutoregressiveEngine(Engine):
    """Plain decoding: one token per forward."""

    def step(self, s: StepState) -> StepState:
        done = self.rows.done.clone()
        logits = self.model(s.c[:, None], positions=self.positions(torch.zeros(1, dtype=torch.long, device=self.device)),
                            cache=self.cache)
        nxt, _ = self.sample(logits[:, -1], self.sampling, want_probs=False)
        self.advance(nxt[:, None], torch.ones_like(nxt), done)
        return StepState(c=nxt)


class PassEngine(Engine):
    """PaSS, paper mode (DESIGN §1.1): a drafting pass on [c, LA_1..LA_k], then a validation pass on
    [x, d_1..d_k]. Each iteration costs two forwards and yields 2 + accepted tokens."""

    passes_per_step = 2

    @staticmethod
    def step_tokens(k: int, tree=None) -> int:
        return k + 1

    @staticmethod
    def step_emits(k: int, tree=None) -> int:
        return k + 2  # the validation pass's accepted drafts and correction, then the drafting pass's token

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k, dev = self.k, self.device
        self.offsets = torch.arange(k + 1, device=dev)
        self.la_index = torch.arange(k, device=dev)
        self.draft_block = None if self.la_weight is None else self.la_block(self.la_index)
        self.draft_sampling = self.sampling.repeat(k)
        self.want_probs = not self.sampling.greedy
        self.start_probs = None  # [B, k, V] one-hot at token 0: the placeholder drafts' distribution (start)

    def reset(self) -> None:
        super().reset()
        self.draft_sampling.copy_(self.sampling.repeat(self.k))

    def draft_from(self, la_logits: torch.Tensor):
        """la_logits [B, k, V] -> drafts [B, k] and their warped distributions (None when all greedy)."""
        B, k, V = la_logits.shape
        drafts, probs = self.sample(la_logits.reshape(B * k, V), self.draft_sampling, self.want_probs)
        return drafts.view(B, k), None if probs is None else probs.view(B, k, V)

    def drafting_pass(self, c: torch.Tensor) -> StepState:
        """[c, LA_1..LA_k]: the exact next token x after c, and drafts for the k tokens after x. Commits c."""
        done = self.rows.done.clone()
        embeds = self.lookahead_embeds(c[:, None], self.draft_block)
        hidden = self.model(None, positions=self.positions(self.offsets), cache=self.cache,
                            inputs_embeds=embeds, return_hidden=True)
        logits = self.model.lm_head_logits(hidden)                              # [B, k+1, V]
        x, _ = self.sample(logits[:, 0], self.sampling, want_probs=False)
        drafts, probs = self.draft_from(logits[:, 1:])
        self.advance(x[:, None], torch.ones_like(x), done)
        return StepState(c=x, drafts=drafts, draft_probs=probs)

    def validation_pass(self, s: StepState, groups: Optional[torch.Tensor] = None) -> tuple:
        """[c, d_1..d_k] -> verify; commits c and the accepted drafts, emits them and the correction/bonus, checks
        the capacity for the next step.
        Returns (hidden [B, Q, d], the logits of head_logits, the new pending token [B], groups[accepted] or None)."""
        done = self.rows.done.clone()
        ids = torch.cat([s.c[:, None], s.drafts], 1)
        hidden = self.forward_block(ids, s)
        logits = self.head_logits(hidden)                                       # [B, k+1 or Q, V]
        out, accepted = self.verify(logits[:, : self.k + 1], s.drafts, s.draft_probs)
        count, nxt, group = self.step_fn(_VERIFIED)(out, accepted, groups)
        self.advance(out, count, done, accepted)
        return hidden, logits, nxt, group

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits a validation pass projects: its k+1 verify rows."""
        return self.model.lm_head_logits(hidden[:, : self.k + 1])

    def forward_block(self, ids: torch.Tensor, s: StepState) -> torch.Tensor:
        return self.model(ids, positions=self.positions(self.offsets), cache=self.cache, return_hidden=True)

    def start(self, c: torch.Tensor) -> StepState:
        """No forward: the first step validates placeholder drafts, token 0 drawn with probability 1. Any
        draft with the distribution it was drawn from verifies exactly, so the output is unchanged, and the
        first step is the captured one (a drafting pass here would be an eager forward that yields one token)."""
        B = c.shape[0]
        drafts = torch.zeros(B, self.k, dtype=torch.long, device=self.device)
        probs = None
        if self.want_probs:
            if self.start_probs is None or self.start_probs.shape[0] != B:
                self.start_probs = torch.zeros(B, self.k, self.model.head_weight.shape[0], device=self.device)
                self.start_probs[..., 0] = 1.0
            probs = self.start_probs
        return StepState(c=c, drafts=drafts, draft_probs=probs)

    def step(self, s: StepState) -> StepState:
        _, _, nxt, _ = self.validation_pass(s)
        return self.drafting_pass(nxt)


class FusedPassEngine(PassEngine):
    """PaSS, fused mode (DESIGN §1.2): one forward on [c, d_1..d_k] plus k+1 groups of k look-ahead
    tokens; group j sits after c..d_j, so after accepting a drafts, group a drafts the next iteration."""

    passes_per_step = 1

    @staticmethod
    def step_tokens(k: int, tree=None) -> int:
        return (k + 1) ** 2

    @staticmethod
    def step_emits(k: int, tree=None) -> int:
        return k + 1

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        k, dev = self.k, self.device
        mask, pos = masks.fused_layout(k)
        self.fused_mask = masks.pack(mask).to(dev)
        self.fused_offsets = pos.to(dev)
        self.fused_block = None if self.la_weight is None else self.la_block(torch.arange(k, device=dev).repeat(k + 1))
        # Row j of group a (a = accepted drafts) is k+1 + a*k + j: its outputs are "j+1 tokens after nxt" distributions.
        self.groups = (k + 1) + torch.arange(k + 1, device=dev)[:, None] * k + self.la_index[None, :]   # [k+1, k]
        self.row_sampling = self.sampling.repeat(self.q_step)

    def reset(self) -> None:
        super().reset()
        self.row_sampling.copy_(self.sampling.repeat(self.q_step))

    def greedy_rows(self, batch: int) -> bool:
        """Whether a step takes every row's argmax in one `sample` call (`greedy_step`): all rows greedy, and
        B x (k+1)^2 within `greedy_rows_max()` and `fused_head_max_rows()` (it reads every row's logits)."""
        rows = batch * self.q_step
        return not self.want_probs and rows <= greedy_rows_max() and rows <= fused_head_max_rows()

    def forward_block(self, ids: torch.Tensor, s: StepState) -> torch.Tensor:
        embeds = self.lookahead_embeds(ids, self.fused_block)
        return self.model(None, positions=self.positions(self.fused_offsets), cache=self.cache,
                          tree_mask=self.fused_mask, inputs_embeds=embeds, return_hidden=True)

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every row's logits in one lm_head call while B x (k+1)^2 rows stay within `fused_head_max_rows()`:
        the group that drafts is known only after verifying, and a second call would read the whole lm_head
        weight again (on Qwen2.5-1.5B, 467 MB: ~0.11 ms, about what a step at k = 1 costs over `ar`'s).
        Past that, the verify rows here and the chosen group's rows in `step`."""
        if hidden.shape[0] * hidden.shape[1] <= fused_head_max_rows():
            return self.model.lm_head_logits(hidden)
        return super().head_logits(hidden)

    def greedy_step(self, s: StepState) -> StepState:
        """A greedy step with one argmax call for all of its rows: verifying greedy drafts is comparing them with
        the model's argmax tokens, and the next drafts are the argmax tokens of the chosen group. Three sampler
        kernels instead of the verify op's five and the draft sample's three; the same `sample` op as `ar`'s."""
        done = self.rows.done.clone()
        hidden = self.forward_block(torch.cat([s.c[:, None], s.drafts], 1), s)
        return self.match_step(hidden, self.row_sampling, s.drafts, self.groups, done)

    def step(self, s: StepState) -> StepState:
        if self.greedy_rows(s.c.shape[0]):
            return self.greedy_step(s)
        hidden, logits, nxt, idx = self.validation_pass(s, self.groups)
        if logits.shape[1] == hidden.shape[1]:
            la_logits = logits.gather(1, idx[:, :, None].expand(-1, -1, logits.shape[-1]))
        else:
            group = hidden.gather(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]))
            la_logits = self.model.lm_head_logits(group)
        drafts, probs = self.draft_from(la_logits)
        return StepState(c=nxt, drafts=drafts, draft_probs=probs)


def _verified(out, accepted, groups):
    """After a verify: the tokens each row emits (accepted + 1), its next pending token out[accepted], and with
    `groups` [k+1, k] the rows groups[accepted] (the fused step's look-ahead group that drafts next)."""
    a = accepted.long()
    return a + 1, out.gather(1, a[:, None]).squeeze(1), None if groups is None else groups[a]


_VERIFIED = _Fused("verified", _verified, switch="PASS_EXT_FUSE_STEP",
                   key=lambda *a: (a[0].shape[0] == 1, a[2] is None))


def _greedy_verified(t, drafts, groups):
    """A greedy fused step's verify from t [B, Q], the argmax token of every row: accepted = the leading drafts
    [B, k] equal to t (then t[:, :k+1] is what the rows emit), the count emitted (accepted + 1), the next pending
    token t[accepted] and the next drafts, t at the rows of group `accepted` (`groups` [k+1, k])."""
    k = drafts.shape[1]
    accepted = (t[:, :k] == drafts).long().cumprod(1).sum(1)
    return accepted, accepted + 1, t.gather(1, accepted[:, None]).squeeze(1), t.gather(1, groups[accepted])


_GREEDY_VERIFIED = _Fused("greedy_verified", _greedy_verified, switch="PASS_EXT_FUSE_STEP",
                          key=lambda *a: a[0].shape[0] == 1)


def top_tokens(logits: torch.Tensor, w: int) -> torch.Tensor:
    """Indices [R, w] of the w largest of each row of logits [R, V], best first (ties in any order).

    In two rounds when V splits into chunks of 256..8192 columns: the w best of every chunk, then the w best of
    those. On CUDA torch.topk takes one block per short row, but a multi-pass radix select over the grid for a
    whole vocabulary (4 kernels, 41 µs on Qwen2.5-1.5B's 151936 at one row on the H200)."""
    R, V = logits.shape
    S = next((s for s in range(256, min(V // 2, 8192) + 1) if V % s == 0 and s >= w), 0)
    if not S:
        return logits.topk(w, dim=-1).indices
    C = V // S
    val, idx = logits.view(R, C, S).topk(w, dim=-1)                                     # [R, C, w]
    idx = idx + torch.arange(0, V, S, device=logits.device)[None, :, None]
    best = val.view(R, C * w).topk(w, dim=-1).indices                                   # [R, w]
    return idx.view(R, C * w).gather(1, best)


def _tree_walk(t, drafts, parent, path, depth, groups):
    """The accepted path of a tree step. t [B, n]: the model's token at every node; drafts [B, N]: the nodes'
    tokens (node 0, the root, has none). Node v is on the accepted path when every node of its path holds its
    parent's sampled token (the root and the path's padding, node 0, count as held); siblings differ, so the
    deepest such node, `final`, is unique (0, the root: no draft accepted). Returns (accepted depth [B], the
    path's nodes [B, k+1] (past the depth: 0), the model's tokens along it [B, k+1] (past the depth: the root's),
    the next pending token [B], the rows of final's look-ahead group [B, k])."""
    B, n = t.shape
    held = torch.cat([torch.ones_like(drafts[:, :1], dtype=torch.bool),
                      t.gather(1, parent[None].expand(B, -1)) == drafts], 1)                # [B, n]
    on_path = held[:, path.reshape(-1)].view(B, n, -1).all(-1)
    final = (on_path.long() * depth).argmax(1)
    nodes = path[final]
    return depth[final], nodes, t.gather(1, nodes), t.gather(1, final[:, None]).squeeze(1), groups[final]


_TREE_WALK = _Fused("tree_walk", _tree_walk, switch="PASS_EXT_FUSE_STEP", key=lambda *a: a[0].shape[0] == 1)


class TreePassEngine(Engine):
    """PaSS over a draft tree, in one pass per step: the fused mode of DESIGN §1.2 with several candidates per
    look-ahead position. A node of the tree is a path of ranks ((1, 0): the second-best token of LA_1, then
    LA_2's best), drawn from the look-ahead logits of the previous step; every node carries its own group of k
    look-ahead tokens (`masks.tree_layout`).

    Verification samples the model's own token at every node (greedy: its argmax), each node with its own
    random numbers, then follows the children that equal those tokens from the root: the emitted tokens are
    the model's samples along that path, so the output is plain decoding's (greedy: the same tokens; sampling:
    the same law, since each emitted token is drawn from the model given the tokens before it, and siblings
    hold distinct tokens, so which branch is followed depends only on earlier draws). No draft distribution is
    needed. The accepted nodes' K/V then move next to the committed prefix (`KVCache.move`)."""

    @staticmethod
    def step_tokens(k: int, tree=None) -> int:
        return masks.tree_layout(masks.default_tree(k) if tree is None else tree, k).rows

    @staticmethod
    def step_emits(k: int, tree=None) -> int:
        return k + 1  # a path of at most k (the depth) accepted drafts and the token after it

    def __init__(self, *args, tree=None, **kwargs):
        super().__init__(*args, **kwargs)
        k, dev = self.k, self.device
        lay = masks.tree_layout(masks.default_tree(k) if tree is None else tree, k)
        self.layout = lay
        n = lay.nodes
        self.q_step = lay.rows
        self.width = int(lay.rank.max()) + 1                    # candidates taken per look-ahead position
        vocab = self.model.head_weight.shape[0]
        if self.width > vocab:
            raise ValueError(f"draft tree ranks reach {self.width - 1}, but the vocabulary has {vocab} tokens")
        self.tree_mask = masks.pack(lay.mask).to(dev)
        self.offsets = lay.offsets.to(dev)
        self.group_block = None if self.la_weight is None else self.la_block(torch.arange(k, device=dev).repeat(n))
        self.path = lay.path.to(dev)                                               # [n, k+1]
        self.parent = lay.path[1:].gather(1, lay.depth[1:, None] - 1).squeeze(1).to(dev)   # [N]
        self.depth = lay.depth.to(dev)                                            # [n]
        self.dst = torch.arange(1, k + 1, device=dev)
        self.groups = (n + torch.arange(n)[:, None] * k + torch.arange(k)[None, :]).to(dev)   # [n, k]
        self.pick = ((lay.depth[1:] - 1) * self.width + lay.rank[1:]).to(dev)            # [N] into [k * width]
        self.node_sampling = self.sampling.repeat(n)
        # One draft per look-ahead position (width 1): the tree is a chain, node v at depth v (`chain_step`).
        self.chain = self.width == 1
        self.chain_groups = self.groups[:, : n - 1].contiguous()                       # [n, N]: LA_1..LA_N's rows
        self.row_sampling = self.chain_sampling() if self.chain else None

    def chain_sampling(self) -> Sampling:
        """[B x Q] per-row parameters of a chain step's one `sample` call: the nodes' rows as the call samples, the
        look-ahead rows greedy (temperature 0: their argmax is the next step's draft)."""
        Q, n = self.layout.rows, self.layout.nodes
        rows = self.sampling.repeat(Q)
        node = (torch.arange(Q, device=self.device) < n).repeat(self.sampling.temperature.shape[0])
        rows.temperature = torch.where(node, rows.temperature, torch.zeros_like(rows.temperature))
        return rows

    def reset(self) -> None:
        super().reset()
        self.node_sampling.copy_(self.sampling.repeat(self.layout.nodes))
        if self.row_sampling is not None:
            self.row_sampling.copy_(self.chain_sampling())

    def start(self, c: torch.Tensor) -> StepState:
        """No forward: the first step checks placeholder drafts (each node's token is its rank, so siblings
        differ); checking is sampling, so any drafts leave the output unchanged."""
        # A tensor of its own, not a view: the captured step's inputs are not views either, and a compiled walk
        # that saw a view here would have to recompile inside the capture.
        drafts = self.layout.rank[1:].to(self.device)[None].expand(c.shape[0], -1).clone()
        return StepState(c=c, drafts=drafts)

    def step(self, s: StepState) -> StepState:
        lay, k = self.layout, self.k
        n, Q = lay.nodes, lay.rows
        done = self.rows.done.clone()
        B = s.c.shape[0]
        embeds = self.lookahead_embeds(torch.cat([s.c[:, None], s.drafts], 1), self.group_block)
        hidden = self.model(None, positions=self.positions(self.offsets), cache=self.cache,
                            tree_mask=self.tree_mask, inputs_embeds=embeds, return_hidden=True)
        one_call = B * Q <= fused_head_max_rows()
        if self.chain and one_call and chain_step_enabled():
            return self.chain_step(s, hidden, done)
        logits = self.model.lm_head_logits(hidden if one_call else hidden[:, :n])
        V = logits.shape[-1]
        t, _ = self.sample(logits[:, :n].reshape(B * n, V), self.node_sampling, want_probs=False)
        accepted, path, out, nxt, rows = self.step_fn(_TREE_WALK)(t.view(B, n), s.drafts, self.parent, self.path,
                                                                  self.depth, self.groups)
        # Depth d's node to slot d; past `accepted` the root's K/V lands in slots that are not committed.
        self.cache.move(path[:, 1:], self.dst[None].expand(B, -1))
        self.advance(out, accepted + 1, done, accepted)
        if one_call:
            la_logits = logits.gather(1, rows[:, :, None].expand(-1, -1, V))
        else:
            la_logits = self.model.lm_head_logits(hidden.gather(1, rows[:, :, None].expand(-1, -1, hidden.shape[-1])))
        top = top_tokens(la_logits.reshape(B * k, V), self.width).view(B, k * self.width)
        drafts = top[:, self.pick]
        return StepState(c=nxt, drafts=drafts)

    def chain_step(self, s: StepState, hidden: torch.Tensor, done: torch.Tensor) -> StepState:
        """The rest of a step whose tree is a chain (`self.chain`), with every row's logits in one lm_head call: one
        `sample` call takes the model's token at every node (sampled as the call asks) and the argmax of every
        look-ahead row (`chain_sampling`); the accepted drafts are the leading ones equal to their parent's token,
        and the next drafts the argmax tokens of the last accepted node's group. Node v sits at depth v, so the
        accepted path's K/V are already where `KVCache.move` would put them (the slots past it are not committed).
        Three sampler kernels instead of the node sample, the walk, the move and a top-k over the chosen group;
        the same law as the general step, which draws the same drafts (`top_tokens` with width 1)."""
        return self.match_step(hidden, self.row_sampling, s.drafts, self.chain_groups, done)


class DraftModelEngine(Engine):
    """Classic speculative sampling: a smaller model with the same vocabulary drafts k tokens one by one,
    the target verifies them in one forward. The draft cache trails the target cache by one token so
    every round's first draft forward has the same shape ([last committed token, c]).

    Round one has that shape too when the draft cache was prefilled one token short (`start_behind`, every
    prompt at least two tokens long); otherwise it feeds c alone and runs eagerly, outside the captured step."""

    first_step_eager = True  # round one feeds the draft model one token, later rounds two (see start_behind)

    @staticmethod
    def step_tokens(k: int, tree=None) -> int:
        return k + 1

    @staticmethod
    def step_emits(k: int, tree=None) -> int:
        return k + 1

    def __init__(self, *args, draft_model, draft_cache, **kwargs):
        super().__init__(*args, **kwargs)
        self.draft_model, self.draft_cache = draft_model, draft_cache
        self.offsets = torch.arange(self.k + 1, device=self.device)
        self.want_probs = not self.sampling.greedy
        self.last = None  # [B] the last committed token, fed again to the draft model
        self.first_round = True

    def park_done_rows(self) -> None:
        super().park_done_rows()
        self.draft_cache.lens.masked_fill_(self.rows.done, 0)

    def reset(self) -> None:
        super().reset()
        self.first_round = True
        self.first_step_eager = True

    def start_behind(self, last: torch.Tensor) -> None:
        """The draft cache holds each prompt but its last two tokens, `last` [B] the second-to-last: round one
        feeds [last, c] like every later round, so it is the captured step too."""
        self.set_last(last)
        self.first_round = False
        self.first_step_eager = False

    def set_last(self, last: torch.Tensor) -> None:
        """Keep `last` [B] in the buffer the draft model reads next round: in place once it exists, since a
        captured step (of this call or an earlier one) reads that buffer on its next replay."""
        if self.last is None:
            self.last = last.clone()
        else:
            self.last.copy_(last)

    def draft_positions(self, offsets):
        return self.draft_cache.lens.long()[:, None] + offsets[None, :]

    def step(self, s: StepState) -> StepState:
        k, dev, done = self.k, self.device, self.rows.done.clone()
        dc = self.draft_cache
        if self.first_round:  # both caches hold the prompt minus its last token: feed c alone
            ids = s.c[:, None]
        else:                 # the draft cache is one token behind the target: feed it again
            ids = torch.stack([self.last, s.c], 1)
        drafts, probs = [], []
        for i in range(k):
            logits = self.draft_model(ids, positions=self.draft_positions(torch.arange(ids.shape[1], device=dev)),
                                      cache=dc)
            self.stats.draft_forward_passes += 1
            d, p = self.sample(logits[:, -1], self.sampling, self.want_probs)
            dc.lens += torch.where(done, 0, ids.shape[1]).to(torch.int32)
            drafts.append(d)
            probs.append(p)
            ids = d[:, None]
        drafts = torch.stack(drafts, 1)
        draft_probs = torch.stack(probs, 1) if self.want_probs else None
        ids = torch.cat([s.c[:, None], drafts], 1)
        logits = self.model(ids, positions=self.positions(self.offsets), cache=self.cache)
        out, accepted = self.verify(logits, drafts, draft_probs)
        # The capacity check comes after the draft cache's rollback below (parking sets both caches' lengths).
        self.advance(out, accepted.long() + 1, done, accepted, check=False)
        # The last committed token is c (a = 0) or draft a; the draft cache rolls back to hold all but it.
        last = torch.cat([s.c[:, None], drafts], 1).gather(1, accepted.long()[:, None]).squeeze(1)
        self.set_last(last)
        dc.lens.copy_(torch.where(done, dc.lens, self.cache.lens - 1))
        self.first_round = False
        nxt = out.gather(1, accepted.long()[:, None]).squeeze(1)
        self.check_capacity()
        return StepState(c=nxt)


def stop_bounded(eos: bool, room: bool) -> bool:
    """Whether `stop_bound` bounds a call: no EOS, room in the cache for every token (the default capacity), and
    the environment does not set PASS_EXT_STOP_BOUND=0."""
    return not eos and room and os.environ.get("PASS_EXT_STOP_BOUND", "1") != "0"


def stop_bound(engine_cls, k: int, tree, max_new_tokens: int) -> int:
    """Steps before which no row can be done (`run`'s `min_steps`) where `stop_bounded`: a row then ends only at
    max_new_tokens, at most `step_emits` per step."""
    return -(-max_new_tokens // engine_cls.step_emits(k, tree))


ENGINES = {"ar": AutoregressiveEngine, "pass": FusedPassEngine, "pass-paper": PassEngine, "pass-tree": TreePassEngine,
           "draft": DraftModelEngine}



_GUARD_FAILED: list = []  # why the first GuardedGraph failed, if one did: later calls keep to blocking checks


def conditional_graphs_available() -> bool:
    """Whether steps can run under a CUDA graph IF node here (`ops.guarded_graph`): this build's CUDA kernels, a
    torch that keeps a captured graph for editing, and no earlier failure to build one in this process."""
    return (ops.has_cuda_kernels() and not _GUARD_FAILED
            and "keep_graph" in inspect.signature(torch.cuda.CUDAGraph.__new__).parameters)


def conditional_graphs_wanted(min_steps: int) -> bool:
    """Whether a call's captured step runs under an IF node (`StepGraph`'s `conditional`): where the host checks
    for the end from the first step (`min_steps` 0: EOS, or a capacity of the caller's), unless the environment
    sets PASS_EXT_GRAPH_IF=0."""
    return min_steps == 0 and os.environ.get("PASS_EXT_GRAPH_IF", "1") != "0" and conditional_graphs_available()


class StepGraph:
    """One decode step captured as a CUDA graph (DESIGN §4): `replay()` runs forward, verify, commit, stop
    checks and next inputs in one launch, on the state buffers the step was captured with.

    Capturing runs no work, so the constructor first runs one real step eagerly on the capture stream (it
    warms up cuBLAS and the allocator there) and returns its state through `state`. Everything a step
    changes lives in device tensors updated in place; the host-side pass counters are replayed by delta.

    With `conditional`, each replay is a guard kernel and an IF node whose body is the step (`ops.guarded_graph`):
    the body runs only while some row is not done, as the last step left the rows. A replay queued past a call's
    end then costs a few µs, so the host can queue steps ahead of its stop checks (`run`); `steps_run` counts the
    bodies that ran since `arm`. Where the IF graph cannot be built, the step replays plainly (`conditional`
    False) and so do later captures in this process."""

    def __init__(self, engine: Engine, state: StepState, conditional: bool = False):
        dev = engine.device
        self.engine = engine
        self.steps_run = torch.zeros((), dtype=torch.long, device=dev) if conditional else None
        self.guarded = None
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            state = engine.step(state)  # warm-up, a real step
            self.state = StepState(
                c=state.c.clone(),
                drafts=None if state.drafts is None else state.drafts.clone(),
                draft_probs=None if state.draft_probs is None else state.draft_probs.clone())
            before = engine.stats.host_counters()
            self.graph = torch.cuda.CUDAGraph(keep_graph=True) if conditional else torch.cuda.CUDAGraph()
            self.graph.capture_begin()
            try:
                self.prime(engine.step(self.state))  # captured: the step's outputs become the next inputs
            finally:
                self.graph.capture_end()
            after = engine.stats.host_counters()
            if conditional:
                try:
                    self.guarded = ops.guarded_graph(self.graph, engine.rows.done, self.steps_run)
                except RuntimeError as e:  # a body the IF node cannot hold, a driver without conditional nodes
                    _GUARD_FAILED.append(str(e))
                    warnings.warn(f"pass_ext: the decode step cannot run under a CUDA graph IF node ({e}); stop "
                                  "checks block instead (the same tokens)", RuntimeWarning, stacklevel=3)
                    self.graph.instantiate()
        torch.cuda.current_stream(dev).wait_stream(stream)
        engine.stats.forward_passes, engine.stats.draft_forward_passes = before
        self.delta = (after[0] - before[0], after[1] - before[1])
        self.conditional = self.guarded is not None

    def prime(self, state: StepState) -> None:
        """Copy a state into the captured inputs (from eager steps of a new call on the same buffers)."""
        self.state.c.copy_(state.c)
        if state.drafts is not None:
            self.state.drafts.copy_(state.drafts)
        if state.draft_probs is not None:
            self.state.draft_probs.copy_(state.draft_probs)

    def arm(self) -> None:
        """Before a call's first replay (conditional): the count of bodies run at zero."""
        self.steps_run.zero_()

    def replay(self) -> StepState:
        if self.guarded is not None:
            self.guarded.launch()
        else:
            self.graph.replay()
        self.engine.stats.add_host_counters(*self.delta)
        return self.state

    def settle(self, replays: int) -> None:
        """After a call's replays (conditional): take the host counters of the bodies that did not run back."""
        skipped = replays - int(self.steps_run)
        self.engine.stats.add_host_counters(-skipped * self.delta[0], -skipped * self.delta[1])


def run(engine: Engine, c: torch.Tensor, sync_every: int, on_sync: Optional[Callable[[], None]] = None,
        cuda_graphs: bool = False, graph: Optional[StepGraph] = None,
        min_steps: int = 0, conditional: bool = False) -> tuple[int, Optional[StepGraph]]:
    """Iterate steps until every row is done; the host looks at device state every `sync_every` steps.

    `min_steps`: no row can be done before that many steps (the caller's bound, `stop_bound`). The host checks
    for the end only from there, once at `min_steps` itself and then every `sync_every` steps; `on_sync` still
    runs every `sync_every` steps. A blocking check leaves the GPU idle until the host launches the next step
    (~0.05-0.2 ms on an H200: a step's graph, the host's loop and its launch). With `conditional` (and
    `cuda_graphs`; the caller's choice, `conditional_graphs_wanted`) the step is captured under an IF node
    (`StepGraph`) and, where no `on_sync` needs the tokens at each check, checked one check late: the host queues
    the steps up to the next check and then reads the done flags the previous check copied out; the steps queued
    past the end run only their guard (a few µs each).

    With `cuda_graphs` (CUDA only), `graph`, a step captured earlier on the same engine and buffers, is
    primed with the state and replayed from the first step (from the second for engines whose first step
    differs: the draft method's first round), or a new one is captured. Returns (steps run, the graph)."""
    engine.check_capacity()
    state = engine.start(c)
    engine.check_capacity()
    conditional = cuda_graphs and conditional
    if graph is not None and graph.conditional != conditional:
        graph = None  # captured for the other schedule: capture again
    steps = replays = 0
    primed = False
    flags = pending = None
    while True:
        if primed:
            graph.replay()
            replays += 1
        elif cuda_graphs and (steps >= 1 or not engine.first_step_eager):
            fresh = graph is None
            if fresh:
                graph = StepGraph(engine, state, conditional)  # runs one real step, then captures the next
            else:
                graph.prime(state)
            if graph.conditional:
                graph.arm()
                flags = [(torch.empty_like(engine.rows.done, device="cpu", pin_memory=True), torch.cuda.Event())
                         for _ in range(2)]
            if not fresh:
                graph.replay()
                replays += 1
            primed = True
        else:
            state = engine.step(state)
        steps += 1
        synced = steps % sync_every == 0
        if synced and on_sync is not None:
            on_sync()
        if not ((synced or steps == min_steps) and steps >= min_steps):
            continue
        if flags is None or on_sync is not None:
            if bool(engine.rows.done.all()):
                if flags is not None:
                    graph.settle(replays)
                return steps, graph
            continue
        flag, event = flags[0]
        flag.copy_(engine.rows.done, non_blocking=True)
        event.record()
        flags.reverse()
        if pending is not None:
            pending[1].synchronize()
            if bool(pending[0].all()):
                graph.settle(replays)
                return steps, graph
        pending = (flag, event)
