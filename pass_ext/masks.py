"""Tree masks for attention_with_kv_cache: bit-packed int64 [Q, ceil(Q/64)], bit j of row i set when new
token i may attend to new token j. Builders for causal, paper-mode, fused-mode (DESIGN §1.2) and draft-tree layouts."""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional

import torch


def pack(mask: torch.Tensor) -> torch.Tensor:
    """bool [Q, Q] -> bit-packed int64 [Q, ceil(Q/64)]."""
    if mask.dim() != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"mask must be a square [Q, Q] bool tensor, got shape {tuple(mask.shape)}")
    Q = mask.shape[0]
    W = (Q + 63) // 64
    padded = torch.zeros(Q, W * 64, dtype=torch.long, device=mask.device)
    padded[:, :Q] = mask.long()
    bits = padded.view(Q, W, 64) << torch.arange(64, device=mask.device)
    return bits.sum(-1)  # distinct bits: the sum is the OR (bit 63 wraps to the sign, as intended)


def unpack(packed: torch.Tensor, Q: int) -> torch.Tensor:
    """bit-packed int64 [Q, ceil(Q/64)] -> bool [Q, Q]."""
    bits = (packed.unsqueeze(-1) >> torch.arange(64, device=packed.device)) & 1
    return bits.view(packed.shape[0], -1)[:, :Q].bool()


def causal(Q: int, device=None) -> torch.Tensor:
    return pack(torch.ones(Q, Q, dtype=torch.bool, device=device).tril())


def fused_layout(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused-mode block of DESIGN §1.2 for k look-ahead tokens: the draft tree that is a chain of k nodes.

    Tokens: [c, d_1..d_k] (causal), then k+1 groups of k look-ahead tokens; group j sits after c..d_j.
    Returns (bool mask [Q, Q], position offsets [Q] relative to c), Q = (k+1)^2.
    """
    lay = tree_layout([(0,) * d for d in range(1, k + 1)], k)
    return lay.mask, lay.offsets


def fused(k: int, device=None) -> torch.Tensor:
    return pack(fused_layout(k)[0]).to(device)


# How often the model's next token had rank r (0-based) among a look-ahead position's draft logits: LA_1, LA_2,
# LA_3 on Qwen2.5-Coder-1.5B's own greedy continuations of 8 held-out HumanEval prompts (teacher-forced, 1032
# positions). Only the order of the products matters: it shapes `default_tree`; deeper positions reuse LA_3's.
RANK_PROFILE = ((0.587, 0.105, 0.066, 0.036, 0.020, 0.019, 0.007, 0.006),
                (0.227, 0.152, 0.079, 0.052, 0.044, 0.044, 0.035, 0.034),
                (0.040, 0.027, 0.012, 0.015, 0.020, 0.019, 0.018, 0.018))
TREE_ROWS = 8  # rows of x that the decode_linear op takes in one mma n-tile: what a default tree fills


def rank_weight(profile, d: int, r: int) -> float:
    """profile[d][r]: how likely the token after an accepted path of depth d is the rank-r draft of LA_{d+1}.
    Depths past the profile reuse its last row; ranks past a row, 0.9x per rank after its last entry."""
    row = profile[min(d, len(profile) - 1)]
    return row[min(r, len(row) - 1)] * 0.9 ** max(0, r - len(row) + 1)


def path_probability(path, profile) -> float:
    """How likely a draft path (a tuple of ranks) is accepted whole: the product of its ranks' weights."""
    p = 1.0
    for d, r in enumerate(path):
        p *= rank_weight(profile, d, r)
    return p


def expected_tree_tokens(paths, profile) -> float:
    """Tokens a tree step yields on average under `profile`: 1 (the model's own token) plus, per node, the
    probability that its path is accepted (every node on the accepted path emits one more token)."""
    return 1.0 + sum(path_probability(p, profile) for p in paths)


def default_tree(k: int, nodes: Optional[int] = None, profile=RANK_PROFILE) -> list:
    """The `nodes` most likely draft paths of depth <= k under `profile` (RANK_PROFILE unless measured ones are
    given; each path a tuple of ranks, see `tree_layout`), best first. Default nodes: as many as fill TREE_ROWS
    rows with their look-ahead groups, and at least k (a chain)."""
    if nodes is None:
        nodes = max(k, TREE_ROWS // (k + 1) - 1)
    width = max(len(profile[0]), nodes)
    chosen, frontier = [], [(-rank_weight(profile, 0, r), (r,)) for r in range(width)]
    heapq.heapify(frontier)
    while frontier and len(chosen) < nodes:
        neg, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < k:
            for r in range(width):
                heapq.heappush(frontier, (neg * rank_weight(profile, len(path), r), path + (r,)))
    return chosen


@dataclass
class TreeLayout:
    """The block of a tree step (`tree_layout`): N+1 nodes, then N+1 groups of k look-ahead tokens."""
    paths: list                # N rank tuples, in node order (node i + 1 = paths[i])
    k: int
    mask: torch.Tensor         # bool [Q, Q]
    offsets: torch.Tensor      # [Q] position offsets relative to the root
    path: torch.Tensor         # [N+1, k+1] node at each depth of a node's path (root .. the node), then 0
    depth: torch.Tensor        # [N+1]
    rank: torch.Tensor         # [N+1] rank of the node's token among its depth's draft logits (root: 0)

    @property
    def nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def rows(self) -> int:
        return self.nodes * (self.k + 1)


def tree_layout(paths, k: int) -> TreeLayout:
    """The block of a tree step for draft paths (tuples of 0-based ranks: (0,) is LA_1's best token, (1, 0) the
    second best for LA_1 followed by LA_2's best), with k look-ahead tokens per group.

    Tokens: node 0 = the pending token c, nodes 1..N = the paths, sorted by depth then ranks; each node attends
    to its ancestors and itself and sits at offset depth. Then one group of k look-ahead tokens per node,
    placed after that node's path (offsets depth+1..depth+k): whichever node ends the accepted path, its group
    drafts the next step. Q = (N+1)(k+1).

    Raises ValueError on a path that is empty, deeper than k, has a negative rank, repeats, or lacks its parent.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    norm = []
    for p in paths:
        try:
            t = tuple(int(r) for r in p)
        except (TypeError, ValueError):
            raise ValueError(f"each draft path must be a tuple of ranks (ints >= 0), got {p!r}") from None
        if not 1 <= len(t) <= k or min(t) < 0:
            raise ValueError(f"each draft path must hold 1..k={k} ranks >= 0, got {p!r}")
        norm.append(t)
    if not norm:
        raise ValueError("a draft tree needs at least one path")
    if len(set(norm)) != len(norm):
        raise ValueError(f"draft paths repeat: {norm}")
    have = set(norm)
    for t in norm:
        if len(t) > 1 and t[:-1] not in have:
            raise ValueError(f"draft path {t} lacks its parent {t[:-1]}")
    norm.sort(key=lambda t: (len(t), t))
    index = {(): 0, **{t: i + 1 for i, t in enumerate(norm)}}
    n = len(norm) + 1
    Q = n * (k + 1)
    mask = torch.zeros(Q, Q, dtype=torch.bool)
    offsets = torch.zeros(Q, dtype=torch.long)
    path = torch.zeros(n, k + 1, dtype=torch.long)
    depth = torch.zeros(n, dtype=torch.long)
    rank = torch.zeros(n, dtype=torch.long)
    for t, v in index.items():
        path_nodes = [index[t[:d]] for d in range(len(t) + 1)]  # root .. v
        mask[v, path_nodes] = True
        path[v, : len(t) + 1] = torch.tensor(path_nodes)
        offsets[v] = depth[v] = len(t)
        if t:
            rank[v] = t[-1]
        base = n + v * k
        for i in range(k):
            mask[base + i, path_nodes] = True
            mask[base + i, base: base + i + 1] = True
            offsets[base + i] = len(t) + 1 + i
    return TreeLayout(norm, k, mask, offsets, path, depth, rank)
