"""`pass_ext.generate`: validate the request, prefill ragged prompts, run the engine for the chosen method,
and return sequences, per-row new tokens and statistics."""
from __future__ import annotations

import math
import os
import random
import time
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from . import engine as E
from . import masks, ops

METHODS = ("ar", "pass", "pass-paper", "pass-tree", "draft")
_converted: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class GenerateStats:
    method: str
    k: int
    forward_passes: int                 # target-model forward passes (prefill excluded)
    draft_forward_passes: int           # draft-model forward passes ("draft" method)
    tokens_per_forward: float           # new tokens per target forward, per row, averaged over rows
    acceptance_by_position: list        # P(draft i accepted | drafts 1..i-1 accepted), i = 1..k
    accepted_length_histogram: list     # verify steps that accepted 0..k drafts (all rows)
    elapsed_s: float
    tokens_per_s: float                 # all rows' new tokens / elapsed_s
    stop_reasons: list                  # per row: "eos", "max_new_tokens" or "length"
    new_tokens: int = 0
    prefill_s: float = 0.0              # of elapsed_s, the prompt prefill
    draft_tree: Optional[list] = None   # "pass-tree": the rank paths of the tree the steps used (auto's pick)

    def summary(self) -> str:
        acc = ", ".join(f"{a:.2f}" for a in self.acceptance_by_position) or "-"
        return (f"{self.method} k={self.k}: {self.new_tokens} tokens in {self.elapsed_s:.2f} s "
                f"({self.tokens_per_s:.1f} tok/s), {self.tokens_per_forward:.2f} tokens/forward, "
                f"acceptance by position [{acc}]")


@dataclass
class GenerateOutput:
    sequences: torch.Tensor             # [B, T] prompt + new tokens per row, right-padded
    new_tokens: list                    # B 1-D LongTensors, without padding
    num_new_tokens: torch.Tensor        # [B]
    stats: GenerateStats
    prompt_lengths: list = field(default_factory=list)


def _as_model(model, name: str = "model"):
    from .model import Model
    if isinstance(model, Model):
        return model
    from .loading import load_model
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        if model not in _converted:
            _converted[model] = load_model(model)
        return _converted[model]
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{name} must be a pass_ext.Model, a transformers PreTrainedModel, a path to an HF "
                        f"directory or .gguf file, or a short model name; got {type(model).__name__}")
    return load_model(model)


def _as_rows(ids, vocab_size: int) -> list:
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be a LongTensor [B, T] or a list of token-id lists, got a "
                             f"{ids.dtype} tensor of shape {tuple(ids.shape)}")
        rows = ids.tolist()
    elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
        if len(ids) == 0:
            raise ValueError("ids holds no rows (batch of zero)")
        rows = [list(r) for r in ids] if isinstance(ids[0], Sequence) else [list(ids)]
    else:
        raise TypeError(f"ids must be a LongTensor [B, T] or a list of token-id lists, got {type(ids).__name__}")
    if len(rows) == 0:
        raise ValueError("ids holds no rows (batch of zero)")
    for b, r in enumerate(rows):
        if len(r) == 0:
            raise ValueError(f"ids row {b} is empty: every prompt needs at least one token")
        for t in r:
            if isinstance(t, bool) or not isinstance(t, int):
                raise TypeError(f"ids row {b} holds {t!r} ({type(t).__name__}): token ids must be ints in "
                                f"[0, {vocab_size})")
            if not 0 <= t < vocab_size:
                raise ValueError(f"ids row {b} holds token id {t!r} outside the vocabulary [0, {vocab_size})")
    return rows


def _per_row(value, B: int, name: str, kind):
    vals = value.tolist() if isinstance(value, torch.Tensor) else value
    vals = list(vals) if isinstance(vals, (list, tuple)) else [vals] * B
    if len(vals) != B:
        raise ValueError(f"{name} must be one value or {B} values (one per row), got {len(vals)}")
    out = []
    for v in vals:
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a number, got {v!r}")
        out.append(kind(v))
    return out


def make_sampling(B, temperature, top_k, top_p, device) -> E.Sampling:
    temps = _per_row(temperature, B, "temperature", float)
    ks = _per_row(top_k, B, "top_k", int)
    ps = _per_row(top_p, B, "top_p", float)
    for t in temps:
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
    for k in ks:
        if k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {k}")
    for p in ps:
        if not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p}")
    return E.Sampling(torch.tensor(temps, dtype=torch.float32, device=device),
                      torch.tensor(ks, dtype=torch.int32, device=device),
                      torch.tensor(ps, dtype=torch.float32, device=device))


def _eos_ids(model, eos_token_id) -> list:
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None or eos_token_id is False:
        return []
    if eos_token_id is True:
        raise TypeError("eos_token_id must be an int, a list of ints, None (the model's) or False (no EOS stop), "
                        "got True")
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < model.config.vocab_size:
            raise ValueError(f"eos_token_id {t!r} is outside the vocabulary [0, {model.config.vocab_size})")
    return ids


def _resolve_k(method, model, lookahead, draft_model) -> int:
    if method == "ar":
        return 0
    if method == "draft":
        if draft_model is None:
            raise ValueError("method='draft' needs draft_model= (a smaller model with the same vocabulary, "
                             "e.g. 'qwen2.5-coder-0.5b' for 'qwen2.5-coder-1.5b')")
        k = 4 if lookahead is None else lookahead
    else:
        la = model.lookahead
        if lookahead == "auto":
            if la is None:
                raise ValueError(f"lookahead='auto' with method={method!r} needs look-ahead embeddings, and this "
                                 "model has none loaded")
            return "auto"
        if la is None:
            raise ValueError(
                f"method={method!r} needs look-ahead embeddings, and this model has none loaded: load them with "
                "pass_ext.load_lookahead(model, 'file.safetensors'), train them with `python -m pass_ext train "
                "--model ... --out file.safetensors`, or use method='ar'")
        k = (1 if method == "pass-tree" else la.k) if lookahead is None else lookahead
        if isinstance(k, int) and not isinstance(k, bool) and k > la.k:
            raise ValueError(f"lookahead={k} exceeds the {la.k} look-ahead embeddings loaded for this model "
                             f"(allowed: 1..{la.k})")
    if k == "auto":
        raise ValueError("lookahead='auto' picks k for PaSS (method='pass', 'pass-paper' or 'pass-tree'), not for "
                         f"method={method!r}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"lookahead must be an int in 1..16 (or 'auto' for PaSS) for method={method!r}, "
                        f"got {k!r}")
    if k < 1 or k > 16:
        raise ValueError(f"lookahead must be an int in 1..16 for method={method!r}, got {k!r}")
    return k


def _resolve_tree(method, draft_tree, k, device) -> Optional[list]:
    """draft_tree for method='pass-tree': None (masks.default_tree(k)), an int (that many nodes, shaped by
    masks.RANK_PROFILE) or a sequence of rank paths; validated through masks.tree_layout."""
    if method != "pass-tree":
        if draft_tree is not None:
            raise ValueError(f"draft_tree is only used by method='pass-tree', not {method!r}")
        return None
    if k == "auto":
        if draft_tree is not None:
            raise ValueError("draft_tree must be None with lookahead='auto': auto picks the tree (its depth and "
                             f"nodes, from pass_ext.autotune.TREE_CANDIDATES), got draft_tree={draft_tree!r}")
        return None
    if draft_tree is None or (isinstance(draft_tree, int) and not isinstance(draft_tree, bool)):
        if draft_tree is not None and not 1 <= draft_tree <= 127:
            raise ValueError(f"draft_tree as a node count must be in 1..127, got {draft_tree!r}")
        paths = masks.default_tree(k, draft_tree)
    elif isinstance(draft_tree, (str, bytes)) or not isinstance(draft_tree, Sequence):
        raise TypeError(f"draft_tree must be None, an int (nodes) or a sequence of rank paths like [(0,), (1,), "
                        f"(0, 0)], got {draft_tree!r}")
    else:
        paths = list(draft_tree)
    try:
        layout = masks.tree_layout(paths, k)
    except ValueError as e:
        raise ValueError(f"draft_tree: {e}") from None
    if torch.device(device).type == "cuda" and layout.rows > ops.CUDA_MAX_Q:
        raise ValueError(f"draft_tree with {layout.nodes - 1} nodes at lookahead={k} makes steps of "
                         f"{layout.rows} tokens per row ((nodes + 1) x (k + 1)); the CUDA attention takes at most "
                         f"{ops.CUDA_MAX_Q}")
    return layout.paths


@torch.no_grad()
def prefill(model, cache, rows: list, chunk: int, graphs: Optional["PrefillGraphs"] = None) -> torch.Tensor:
    """Write every prompt but its last token into the cache and commit it: all rows in each forward, in
    chunks of `chunk` tokens, shorter rows padded. A padded token lands past its row's committed length (and
    below the longest row's, so within the capacity), where the next step overwrites it before anything
    reads it. With `graphs` (CUDA), each chunk is padded to a captured length and replayed (PrefillGraphs).
    Runs without autograd whoever calls it (with it, CUDA forwards take the unfused, differentiable path).
    Returns each row's last prompt token [B] (the pending token of the first step)."""
    dev = cache.lens.device
    if dev.type == "cuda":
        chunk = min(chunk, ops.CUDA_MAX_Q)  # the CUDA attention kernel's limit of new tokens per call
    need = [len(r) - 1 for r in rows]
    for s in range(0, max(need), chunk):
        q = min(chunk, max(need) - s)
        pieces = [r[s: min(s + q, n)] for r, n in zip(rows, need)]
        padded = graphs.length(q, cache.capacity - s, len(rows)) if graphs is not None else None
        if padded is not None:
            graphs.run(model, cache, pieces, s, padded)
            continue
        ids = torch.tensor([p + [0] * (q - len(p)) for p in pieces], dtype=torch.long, device=dev)
        pos = torch.arange(s, s + q, device=dev)[None].expand(len(rows), -1)
        model(ids, positions=pos, cache=cache, return_hidden=True)
        cache.lens += torch.tensor([len(p) for p in pieces], dtype=torch.int32, device=dev)
    return torch.tensor([r[-1] for r in rows], dtype=torch.long, device=dev)


def prefill_graphs_enabled() -> bool:
    """Whether `generate` replays prefill chunks as CUDA graphs where it captures the decode step:
    PASS_EXT_PREFILL_GRAPHS, default 1 (0: eager chunks, the same tokens up to near-ties). Read per call."""
    raw = os.environ.get("PASS_EXT_PREFILL_GRAPHS", "1")
    if raw not in ("0", "1"):
        raise ValueError(f"PASS_EXT_PREFILL_GRAPHS must be 0 or 1, got {raw!r}")
    return raw == "1"


class PrefillGraphs:
    """Prefill chunks captured as CUDA graphs on one cache, one graph per model and padded chunk length.

    An eager forward launches a few hundred kernels from Python (norms, projections, attention, rotary and
    residual chains per layer), which for models up to a few billion parameters takes longer than the GPU's
    work: in bench_generate the 135M and the 1.5B spent about the same 20-30 ms per call in their prefill.
    A replay launches them from the device. Chunks are padded to a multiple of PAD tokens (padded tokens land
    past each row's committed length, as a short row's do in a batch), so at most eight lengths cover every
    prompt and a row computes at most PAD - 1 tokens in vain. A length's first chunk runs eagerly on the
    graph's own buffers, which does that chunk's work and warms up the kernels, and is then captured
    (capturing runs nothing); later chunks of that length replay. The graphs of one cache share one memory
    pool: they never run at the same time. Chunks of more than MAX_TOKENS tokens over all rows run eagerly:
    there the GPU's work outlasts the launches, which overlap it, and a graph would keep their activations."""

    PAD = 16
    MAX_TOKENS = 4096

    def __init__(self):
        # (id(model), id(cache), length) -> (CUDAGraph, or None where its capture ran out of memory,
        #                                   inputs [B, 2 * length + 1] int64)
        self.graphs: dict = {}
        self.pool = None

    def __len__(self) -> int:
        """Captured graphs (lengths whose capture ran out of memory, and run eagerly, do not count)."""
        return sum(graph is not None for graph, _ in self.graphs.values())

    @classmethod
    def length(cls, q: int, room: int, batch: int) -> Optional[int]:
        """The padded length of a chunk of q tokens per row for `batch` rows with `room` slots left in the
        cache after its start (None: the chunk runs eagerly)."""
        n = -(-q // cls.PAD) * cls.PAD
        return n if n <= min(room, ops.CUDA_MAX_Q) and batch * n <= cls.MAX_TOKENS else None

    def run(self, model, cache, pieces: list, start: int, length: int) -> None:
        """Prefill one chunk: pieces[b] (at most `length` tokens) at positions start.. of row b, committed."""
        dev = cache.lens.device
        host = torch.zeros(len(pieces), 2 * length + 1, dtype=torch.long)
        for b, p in enumerate(pieces):
            host[b, :len(p)] = torch.tensor(p, dtype=torch.long)
        host[:, length: 2 * length] = torch.arange(start, start + length)
        host[:, -1] = torch.tensor([len(p) for p in pieces])
        key = (id(model), id(cache), length)
        entry = self.graphs.get(key)
        if entry is not None:
            graph, inputs = entry
            inputs.copy_(host)
            if graph is None:  # its capture ran out of memory: this length runs eagerly on the same buffers
                self._chunk(model, cache, inputs, length)
            else:
                graph.replay()
            return
        inputs = host.to(dev)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            self._chunk(model, cache, inputs, length)  # this chunk's work, and the warm-up of the capture
            graph = self._capture(model, cache, inputs, length)
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graphs[key] = (graph, inputs)

    def _capture(self, model, cache, inputs: torch.Tensor, length: int):
        """The chunk captured as a graph (capturing runs nothing), or None where the capture ran out of GPU memory:
        the chunk's work is already done, and a graph is only a faster way to launch it."""
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        oom = False
        graph.capture_begin(pool=self.pool)
        try:
            self._chunk(model, cache, inputs, length)
        except torch.OutOfMemoryError:
            oom = True
        finally:
            try:
                graph.capture_end()
            except RuntimeError:
                if not oom:  # an out-of-memory error can leave the capture invalid; anything else is raised
                    raise
        if not oom:
            return graph
        del graph
        torch.cuda.empty_cache()
        return None

    @staticmethod
    def _chunk(model, cache, inputs: torch.Tensor, length: int) -> None:
        ids, positions = inputs[:, :length].contiguous(), inputs[:, length: 2 * length].contiguous()
        model(ids, positions=positions, cache=cache, return_hidden=True)
        cache.commit(inputs[:, -1])


def generate(
    model,
    ids,
    *,
    max_new_tokens: int = 128,
    method: str = "pass",
    lookahead: Optional[int] = None,
    temperature: Union[float, Sequence[float]] = 0.0,
    top_k: Union[int, Sequence[int]] = 0,
    top_p: Union[float, Sequence[float]] = 1.0,
    seed: Optional[int] = None,
    draft_model=None,
    draft_tree=None,
    eos_token_id=None,
    pad_token_id: Optional[int] = None,
    stream: Optional[Callable] = None,
    max_length: Optional[int] = None,
    sync_every: Optional[int] = None,
    prefill_chunk: int = 512,
    cuda_graphs: Optional[bool] = None,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row; every method returns what plain decoding would (greedy:
    the same tokens; sampling: the same distribution).

    Args:
        model: a pass_ext.Model, or anything pass_ext.load_model accepts (a transformers model object is
            converted once and cached).
        ids: LongTensor [B, T], or a list of B token-id lists of different lengths (ragged batch).
        method: "ar" (plain decoding), "pass" (fused one-pass PaSS), "pass-paper" (the paper's two passes),
            "pass-tree" (fused PaSS over a tree of drafts: several candidates per look-ahead position, each
            step samples the model at every node and keeps the path that matches), "draft" (speculative
            sampling with `draft_model`).
        lookahead: drafts per step k (PaSS: default = the loaded embeddings' k; "draft": default 4), or
            "auto" (PaSS): k picked per batch, 0 included, from measured acceptance and step cost
            (see pass_ext.autotune); the choice is in `stats.k`. "pass-tree": the tree's depth, default 1;
            "auto" there picks the tree's depth and nodes (or plain decoding), shown in `stats.draft_tree`.
        draft_tree: "pass-tree" only: an int (that many draft nodes, the likeliest rank paths) or a list of
            rank paths such as [(0,), (1,), (2,), (0, 0)] ((1,): LA_1's second-best token; (0, 0): LA_1's best,
            then LA_2's best). Default: the likeliest paths that fill 8 rows, (nodes + 1) x (k + 1).
        temperature, top_k, top_p: warping, one value or one per row (temperature 0 = greedy).
        seed: RNG seed for sampling (None: a random one).
        eos_token_id: int or list (default: the model's); False disables EOS stopping.
        stream: called as stream(row, new_token_ids) whenever the host syncs, or an object with
            put()/end() like transformers' streamers (batch of one).
        max_length: cache capacity per row in tokens (prompt, generated tokens and the step's scratch
            slots); rows that would pass it stop with reason "length". Default: room for everything.
        sync_every: steps between host syncs (streaming, stop checks). Default 1 with `stream`, else 4.
        prefill_chunk: prompt tokens per prefill forward (at most 128 on CUDA, the attention kernel's limit).
        cuda_graphs: capture the decode step once and replay it, and the prefill's chunks per padded length
            (CUDA only; PASS_EXT_PREFILL_GRAPHS=0 prefills eagerly). Default: on for CUDA, unless the
            environment sets PASS_EXT_CUDA_GRAPHS=0.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    # Checked before any work: a bad seed or pad id would otherwise fail deep inside torch, and a chunk
    # size below 1 would skip the prefill and silently generate from a cache without the prompt.
    for name, value, low, high in (("seed", seed, -2 ** 63, 2 ** 63), ("pad_token_id", pad_token_id, 0, 2 ** 63),
                                   ("prefill_chunk", prefill_chunk, 1, 2 ** 63)):
        if value is None and name != "prefill_chunk":
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
        if not low <= value < high:
            raise ValueError(f"{name} must be an int in [{low}, {high}), got {value!r}")
    model = _as_model(model)
    if draft_model is not None:
        if method != "draft":
            raise ValueError(f"draft_model is only used by method='draft', not {method!r}")
        draft_model = _as_model(draft_model, "draft_model")
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"draft_model's vocabulary ({draft_model.config.vocab_size}) differs from the "
                             f"model's ({model.config.vocab_size}): speculative sampling needs the same tokenizer")
        if draft_model.device != model.device:
            raise ValueError(f"draft_model is on {draft_model.device}, the model on {model.device}")
    k = _resolve_k(method, model, lookahead, draft_model)
    tree = _resolve_tree(method, draft_tree, k, model.device)
    rows = _as_rows(ids, model.config.vocab_size)
    B, dev = len(rows), model.device
    sampling = make_sampling(B, temperature, top_k, top_p, dev)
    eos = _eos_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if sync_every is None:
        sync_every = 1 if stream is not None else 4
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")

    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda" and os.environ.get("PASS_EXT_CUDA_GRAPHS", "1") != "0"
    elif not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True, False or None (default), got {cuda_graphs!r}")
    elif cuda_graphs and dev.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {dev}")
    if cuda_graphs:
        max_workspaces()  # a bad PASS_EXT_WORKSPACES fails before any work
    graph_prefill = cuda_graphs and prefill_graphs_enabled()
    sampled = not sampling.greedy
    engine_method = method
    bounded = E.stop_bounded(bool(eos), room=max_length is None)

    def first_check(engine_cls, k, tree=None) -> int:
        """Steps before the host's first stop check (E.run's min_steps)."""
        return E.stop_bound(engine_cls, k, tree, max_new_tokens) if bounded else 0

    if k == "auto":
        from . import autotune
        context = max(len(r) for r in rows) + max_new_tokens // 2  # the middle of the call: its bucket
    if k == "auto" and method == "pass-tree":
        max_rows = ops.CUDA_MAX_Q if dev.type == "cuda" else None
        costs = autotune.tree_step_costs(model, B, context, sampled, autotune.tree_options(model.lookahead.k, max_rows))
        profile = autotune.rank_profile(model.lookahead, sampled)
        chosen = model.__dict__.setdefault("auto_tree", {})
        bucket = (B, autotune.context_bucket(context), sampled)
        before = chosen.get(bucket)
        pick = autotune.choose_tree(costs, profile, previous=None if before is None else before[0],
                                    new_tokens=max_new_tokens, sync_every=sync_every,
                                    first_check=lambda o: first_check(E.ENGINES["pass-tree" if o[0] else "ar"], o[0]),
                                    efficiency=autotune.efficiency_of(model, sampled, B, kind="tree"))
        if pick == (0, 0):
            k, tree, engine_method = 0, None, "ar"
        else:
            # The same option keeps the same nodes (and so its workspace and captured step), though the profile
            # moves a little after every call.
            tree = before[1] if before is not None and before[0] == pick else masks.default_tree(*pick, profile)
            k = pick[0]
        chosen[bucket] = (pick, tree)
    elif k == "auto":
        costs = autotune.step_costs(model, method, B, context, sampled, model.lookahead.k)
        chosen = model.__dict__.setdefault("auto_k", {})
        bucket = (method, B, autotune.context_bucket(context), sampled)
        k = chosen[bucket] = autotune.choose_k(costs, autotune.acceptance_of(model.lookahead, sampled),
                                               base=autotune.base_tokens(method), max_k=model.lookahead.k,
                                               previous=chosen.get(bucket), new_tokens=max_new_tokens,
                                               sync_every=sync_every,
                                               first_check=lambda j: first_check(E.ENGINES[method if j else "ar"], j),
                                               efficiency=autotune.efficiency_of(model, sampled, B))
        if k == 0:
            engine_method = "ar"

    engine_cls = E.ENGINES[engine_method]
    q_step = engine_cls.step_tokens(k, tree)
    longest = max(len(r) for r in rows)
    # Default capacity rounded up to 128 slots: calls with similar prompts share one workspace (and graph).
    capacity = -(-(longest + max_new_tokens + q_step + 1) // 128) * 128 if max_length is None else max_length
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise TypeError(f"max_length must be an int, got {max_length!r}")
    if longest - 1 + q_step > capacity:
        raise ValueError(f"max_length={capacity} leaves no room: the longest prompt has {longest} tokens and one "
                         f"{method} step writes {q_step} more (need max_length >= {longest - 1 + q_step})")
    if longest + max_new_tokens > model.config.max_position_embeddings:
        warnings.warn(f"prompt + max_new_tokens ({longest + max_new_tokens}) exceeds the model's "
                      f"max_position_embeddings ({model.config.max_position_embeddings})")
    if seed is None:
        seed = random.getrandbits(62)

    min_steps = first_check(engine_cls, k, tree)
    # The step under an IF node or not (E.StepGraph) is part of the key: an A/B of PASS_EXT_GRAPH_IF within one
    # process keeps each schedule's captured step instead of capturing again at every switch.
    conditional = cuda_graphs and E.conditional_graphs_wanted(min_steps)
    t0 = time.perf_counter()
    with torch.no_grad():
        key = (engine_method, B, k, capacity, max_new_tokens, sampled, len(eos), conditional,
               id(model.lookahead) if engine_method in ("pass", "pass-paper", "pass-tree") else None,
               id(draft_model) if method == "draft" else None, None if tree is None else tuple(tree))
        ws = _workspace(model, key) if cuda_graphs else None
        if ws is None:
            def new_engine():
                cache = model.new_cache(B, capacity)
                out_rows = E.Rows(B, max_new_tokens, eos, pad, dev)
                stats = E.Stats(B, k, dev)
                extra = (dict(draft_model=draft_model, draft_cache=draft_model.new_cache(B, capacity))
                         if method == "draft" else dict(tree=tree) if engine_method == "pass-tree" else {})
                return engine_cls(model, cache, sampling, E.Rng(seed, dev), out_rows, stats, k=k, **extra)
            try:
                eng = new_engine()
            except torch.OutOfMemoryError:
                if not _workspaces(model):
                    raise
                _drop_workspaces(model)  # the kept workspaces of earlier calls hold the memory: free them, retry
                eng = new_engine()
            ws = _Workspace(key, eng)
            if cuda_graphs:
                _keep_workspace(model, ws)
        else:
            ws.reset(sampling, seed, eos, pad)
        eng, out_rows, stats = ws.engine, ws.engine.rows, ws.engine.stats
        graphs = ws.prefill_graphs if graph_prefill else None
        c = prefill(model, eng.cache, rows, prefill_chunk, graphs)
        if method == "draft":
            if min(len(r) for r in rows) >= 2:  # the draft cache one token further behind: round one is captured
                behind = [r[:-1] for r in rows]
                eng.start_behind(prefill(draft_model, eng.draft_cache, behind, prefill_chunk, graphs))
            else:
                prefill(draft_model, eng.draft_cache, rows, prefill_chunk, graphs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        prefill_s = time.perf_counter() - t0
        on_sync = _streamer(stream, out_rows, rows) if stream is not None else None
        _, ws.graph = E.run(eng, c, sync_every, on_sync, cuda_graphs=cuda_graphs, graph=ws.graph,
                            min_steps=min_steps, conditional=conditional)
        if on_sync is not None:
            on_sync(final=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    elapsed = time.perf_counter() - t0
    out = _output(rows, out_rows, stats, method, k, elapsed, pad, tree if engine_method == "pass-tree" else None)
    if engine_method == "pass-tree":
        from . import autotune
        autotune.record_tree_acceptance(model.lookahead, sampled, tree, stats.hist.tolist())
        autotune.record_efficiency(model, sampled, B, out.num_new_tokens.tolist(), stats.active_forwards.tolist(),
                                   kind="tree")
    if engine_method in ("pass", "pass-paper"):
        from . import autotune
        autotune.record_acceptance(model.lookahead, sampled, stats.hist.tolist())
        autotune.record_efficiency(model, sampled, B, out.num_new_tokens.tolist(), stats.active_forwards.tolist(),
                                   passes_per_step=engine_cls.passes_per_step,
                                   base=autotune.base_tokens(engine_method))
    out.stats.prefill_s = prefill_s
    return out


class _Workspace:
    """What one generate call works on — engine (with its cache, sampling, RNG, rows and stats), draft
    cache, captured step and prefill chunks — kept on the model so that the next call with the same shapes
    reuses the buffers and replays the same CUDA graphs instead of capturing new ones."""

    def __init__(self, key, engine: E.Engine):
        self.key, self.engine = key, engine
        caches = [c for c in (getattr(engine, "cache", None), getattr(engine, "draft_cache", None)) if c is not None]
        self.cache_bytes = sum(c.store.numel() * c.store.element_size() for c in caches)
        self.graph: Optional[E.StepGraph] = None
        self.prefill_graphs = PrefillGraphs()

    @property
    def holds_graphs(self) -> bool:
        return self.graph is not None or len(self.prefill_graphs) > 0

    def reset(self, sampling: E.Sampling, seed: int, eos: list, pad: int) -> None:
        eng = self.engine
        eng.cache.lens.zero_()
        if isinstance(eng, E.DraftModelEngine):
            eng.draft_cache.lens.zero_()
        eng.sampling.copy_(sampling)
        eng.rng.seed.fill_(seed)
        eng.rng.offset.zero_()
        eng.rows.reset(pad, eos)
        eng.stats.reset()
        eng.reset()


KEEP_MEMORY_FRACTION = 0.25  # of the GPU's memory, for the KV caches of kept workspaces besides the newest


def max_workspaces() -> int:
    """How many workspaces (cache, buffers, captured step) `generate` keeps per model: PASS_EXT_WORKSPACES,
    default 4. Calls that alternate shapes, settings or k (lookahead="auto" moving between two k) then replay
    their graphs instead of capturing anew; 1 keeps only the last call's. Older workspaces are also dropped
    while their KV caches take more than KEEP_MEMORY_FRACTION of the GPU's memory (see _keep_budget)."""
    raw = os.environ.get("PASS_EXT_WORKSPACES", "4")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"PASS_EXT_WORKSPACES must be an integer >= 1, got {raw!r}")
    return n


def _workspaces(model) -> "OrderedDict":
    return model.__dict__.setdefault("_pass_ext_workspaces", OrderedDict())


def _workspace(model, key) -> Optional[_Workspace]:
    """The model's workspace for the shapes in `key` (now the most recently used), or None."""
    kept = _workspaces(model)
    ws = kept.get(key)
    if ws is not None:
        kept.move_to_end(key)
    return ws


def _keep_budget(ws: _Workspace) -> float:
    """Bytes of KV cache the workspaces kept besides the newest may hold: a fraction of the GPU's memory, so a
    large model at a large batch keeps only its current workspace instead of running out of memory later."""
    dev = ws.engine.device
    if dev.type != "cuda":
        return math.inf
    return KEEP_MEMORY_FRACTION * torch.cuda.get_device_properties(dev).total_memory


def _keep_workspace(model, ws: _Workspace) -> None:
    """Keep a new workspace, dropping the least recently used beyond max_workspaces() or the memory budget."""
    kept = _workspaces(model)
    kept[ws.key] = ws
    limit, budget = max_workspaces(), _keep_budget(ws)

    def older_bytes() -> int:
        return sum(w.cache_bytes for w in kept.values()) - ws.cache_bytes

    dropped = False
    while len(kept) > limit or (len(kept) > 1 and older_bytes() > budget):
        _, old = kept.popitem(last=False)
        dropped |= old.holds_graphs
        del old  # no reference may keep its graph alive past empty_cache below
    if dropped:
        # A dropped graph's private memory pool stays reserved in the allocator's cache: calls with ever new
        # shapes grew the reserved memory by 5 GB over 80 calls in the soak (bench/soak.py). Hand it back.
        torch.cuda.empty_cache()


def _drop_workspaces(model) -> None:
    kept = model.__dict__.pop("_pass_ext_workspaces", None)
    if kept and any(ws.holds_graphs for ws in kept.values()):
        kept.clear()
        torch.cuda.empty_cache()


def release_workspace(model) -> None:
    """Free the caches, buffers and CUDA graphs that `generate` keeps on `model` for its next calls."""
    _drop_workspaces(_as_model(model))


def _streamer(stream, out_rows: E.Rows, prompts: list):
    sent = [0] * len(prompts)
    hf_style = hasattr(stream, "put") and hasattr(stream, "end")
    if hf_style:
        if len(prompts) != 1:
            raise ValueError("a transformers-style streamer (put/end) takes a batch of one; pass a callable "
                             "stream(row, tokens) for batches")
        stream.put(torch.tensor([prompts[0]]))

    def on_sync(final: bool = False):
        n = out_rows.n.tolist()
        if any(n[b] > sent[b] for b in range(len(n))):
            toks = out_rows.out.tolist()
            for b in range(len(n)):
                if n[b] > sent[b]:
                    new = toks[b][sent[b]: n[b]]
                    sent[b] = n[b]
                    if hf_style:
                        stream.put(torch.tensor(new))
                    else:
                        stream(b, new)
        if final and hf_style:
            stream.end()
    return on_sync


def _output(prompts, out_rows: E.Rows, stats: E.Stats, method, k, elapsed, pad, tree=None) -> GenerateOutput:
    n = out_rows.n.cpu()
    gen = out_rows.out.cpu()
    new_tokens = [gen[b, : n[b]].clone() for b in range(len(prompts))]
    width = max(len(p) + int(n[b]) for b, p in enumerate(prompts))
    seqs = torch.full((len(prompts), width), pad, dtype=torch.long)
    for b, p in enumerate(prompts):
        seqs[b, : len(p)] = torch.tensor(p)
        seqs[b, len(p): len(p) + int(n[b])] = new_tokens[b]
    hist = stats.hist.cpu().tolist()
    # P(draft i accepted | reached) = steps accepting >= i / steps accepting >= i-1
    at_least = [sum(hist[i:]) for i in range(k + 1)]
    acc = [at_least[i] / at_least[i - 1] if at_least[i - 1] else 0.0 for i in range(1, k + 1)]
    active = stats.active_forwards.cpu().clamp(min=1).double()
    tpf = float((n.double() / active).mean())
    total = int(n.sum())
    reasons = [E.REASONS.get(int(r), "max_new_tokens") for r in out_rows.reason.cpu()]
    st = GenerateStats(method=method, k=k, forward_passes=stats.forward_passes,
                       draft_forward_passes=stats.draft_forward_passes, tokens_per_forward=tpf,
                       acceptance_by_position=acc, accepted_length_histogram=hist, elapsed_s=elapsed,
                       tokens_per_s=total / elapsed if elapsed > 0 else 0.0, stop_reasons=reasons, new_tokens=total,
                       draft_tree=None if tree is None else [tuple(p) for p in tree])
    return GenerateOutput(sequences=seqs, new_tokens=new_tokens, num_new_tokens=n, stats=st,
                          prompt_lengths=[len(p) for p in prompts])
