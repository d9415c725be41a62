"""Train look-ahead embeddings (DESIGN §5): only LA ∈ R^{k×d} learns, the model stays frozen. Each training
sequence carries many cut points in one forward: a group of k look-ahead tokens after each cut, under a
tree mask, so one pass trains every (cut, i) pair."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .lookahead import LookaheadEmbeddings
from .masks import pack

OBJECTIVES = ("kl", "ce")


@dataclass
class Block:
    """One training layout for sequences of T real tokens with look-ahead groups after `cuts`.

    Token order: the T real tokens, then one group of k look-ahead tokens per cut. The group after cut t
    sees real tokens 0..t and its own earlier look-ahead tokens; LA_i of that group stands at position t+i
    and is trained to predict real token t+1+i."""
    mask: torch.Tensor        # [Q, Q] bool
    positions: torch.Tensor   # [Q] int64
    la_slots: torch.Tensor    # [n] int64, n = len(cuts) * k, index into the Q tokens
    la_index: torch.Tensor    # [n] int64, which LA_i (0-based) stands there
    teacher: torch.Tensor     # [n] int64, real position whose next-token distribution is the target
    label: torch.Tensor       # [n] int64, real position of the token to predict (teacher + 1)
    packed: torch.Tensor      # [Q, ceil(Q/64)] int64, `mask` bit-packed for the attention op


def make_block(T: int, k: int, cuts: Sequence[int]) -> Block:
    if any(t < 0 or t + 1 + k > T - 1 for t in cuts):
        raise ValueError(f"cuts must lie in [0, T-2-k] = [0, {T - 2 - k}] for T={T}, k={k}")
    n = len(cuts) * k
    Q = T + n
    mask = torch.zeros(Q, Q, dtype=torch.bool)
    mask[:T, :T] = torch.ones(T, T, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(T), torch.zeros(n, dtype=torch.long)])
    la_index = torch.arange(k).repeat(len(cuts))
    teacher = torch.zeros(n, dtype=torch.long)
    for g, t in enumerate(cuts):
        base = T + g * k
        for i in range(1, k + 1):
            row = base + i - 1
            mask[row, : t + 1] = True
            mask[row, base: row + 1] = True
            positions[row] = t + i
            teacher[g * k + i - 1] = t + i
    return Block(mask, positions, torch.arange(T, Q), la_index, teacher, teacher + 1, pack(mask))


def token_chunks(tokenizer, texts: Iterable[str], length: int) -> list:
    """Concatenate tokenised texts (EOS between documents when the tokenizer has one) and cut them into
    sequences of `length` tokens."""
    eos = tokenizer.eos_token_id
    stream: list = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    return [stream[i: i + length] for i in range(0, len(stream) - length + 1, length)]


def _la_forward(model, la: LookaheadEmbeddings, ids: torch.Tensor, block: Block, k: int):
    """Frozen model, trainable LA: hidden states [B, Q, d] of the real tokens plus the look-ahead groups."""
    B, T = ids.shape
    dev = ids.device
    n = block.la_slots.numel()
    full = torch.cat([ids, ids.new_zeros(B, n)], 1)
    embeds = model.embed(full)
    la = la.weight[: k].to(dev, embeds.dtype)[block.la_index.to(dev)]              # [n, d]
    embeds = embeds.index_put((torch.arange(B, device=dev)[:, None], block.la_slots.to(dev)[None, :]),
                              la[None].expand(B, -1, -1))
    cache = model.new_cache(B, full.shape[1])
    positions = block.positions.to(dev)[None].expand(B, -1)
    return model(None, positions=positions, cache=cache, tree_mask=block.packed.to(dev),
                 inputs_embeds=embeds, return_hidden=True, attention="torch")


def lookahead_loss(model, la: LookaheadEmbeddings, ids: torch.Tensor, block: Block, k: int,
                   objective: str = "kl") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, top-1 agreement of each LA_i's argmax with the target) for a batch of sequences ids [B, T]."""
    hidden = _la_forward(model, la, ids, block, k)
    T = ids.shape[1]
    dev = ids.device
    q_logits = model.lm_head_logits(hidden[:, block.la_slots.to(dev)])             # [B, n, V]
    with torch.no_grad():
        teacher_logits = model.lm_head_logits(hidden[:, block.teacher.to(dev)].detach())
        labels = ids[:, block.label.to(dev)]
    logq = F.log_softmax(q_logits.float(), -1)
    if objective == "kl":
        p = F.softmax(teacher_logits.float(), -1)
        loss = (p * (torch.log(p.clamp_min(1e-30)) - logq)).sum(-1).mean()
        target = teacher_logits.argmax(-1)
    elif objective == "ce":
        loss = F.nll_loss(logq.reshape(-1, logq.shape[-1]), labels.reshape(-1))
        target = labels
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    agree = (q_logits.argmax(-1) == target).float().view(ids.shape[0], -1, k).mean((0, 1))   # [k]
    return loss, agree


def train_lookahead(
    model,
    data: Union[Sequence[str], Sequence[Sequence[int]]],
    *,
    k: int = 4,
    steps: int = 200,
    seq_len: int = 128,
    batch_size: int = 4,
    cut_stride: int = 4,
    lr: float = 3e-3,
    objective: str = "kl",
    init: Optional[LookaheadEmbeddings] = None,
    eval_data: Optional[Sequence] = None,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = True,
    on_eval: Optional[Callable[[int, dict, LookaheadEmbeddings], None]] = None,
) -> LookaheadEmbeddings:
    """Train k look-ahead embeddings for a frozen `model`.

    Args:
        data: texts (tokenised with model.tokenizer) or token-id sequences; cut into seq_len-token pieces.
        objective: "kl" (self-distillation to the model's own next-token distributions) or "ce" (the data's tokens).
        init: embeddings to resume from (their first k rows; more rows are added if they hold fewer).
        eval_data: held-out sequences: loss and top-1 agreement per LA position are reported every eval_every steps.
        on_eval: called as on_eval(step, result, embeddings so far) after each evaluation (checkpointing).
    Returns:
        trained LookaheadEmbeddings (meta records the training settings).
    """
    from tqdm.auto import tqdm
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
        raise ValueError(f"k must be an int in 1..16, got {k!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, value in (("steps", steps), ("seq_len", seq_len), ("batch_size", batch_size),
                        ("cut_stride", cut_stride), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int >= 1, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if seq_len < k + 3:
        raise ValueError(f"seq_len must be at least k + 3 = {k + 3}, got {seq_len}")
    seqs = _as_sequences(model, data, seq_len, "data")
    evals = (_as_sequences(model, eval_data, seq_len, "eval_data")
             if eval_data is not None and len(eval_data) > 0 else [])
    dev = model.device
    if init is not None:
        init.check_model(model)
        weight = init.weight.detach().clone()
        if weight.shape[0] < k:
            extra = LookaheadEmbeddings.init(model, k, seed=seed).weight.detach()[weight.shape[0]:]
            weight = torch.cat([weight, extra])
        la = LookaheadEmbeddings(weight[:k], model.fingerprint, dict(init.meta))
    else:
        la = LookaheadEmbeddings.init(model, k, seed=seed)
    la = la.to(dev)
    steps_before = int(la.meta.get("steps", 0))
    block = make_block(seq_len, k, list(range(0, seq_len - 1 - k, cut_stride)))
    opt = torch.optim.Adam([la.weight], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rnd = random.Random(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    bar = tqdm(range(steps), desc="train look-ahead", disable=not progress)
    history = []
    for step in bar:
        batch = torch.tensor([seqs[rnd.randrange(len(seqs))] for _ in range(batch_size)], device=dev)
        loss, agree = lookahead_loss(model, la, batch, block, k, objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=" ".join(f"{a:.2f}" for a in agree.tolist()[:4]))
        if evals and ((step + 1) % eval_every == 0 or step + 1 == steps):
            result = evaluate(model, la, evals, block, k, objective, batch_size)
            result["step"] = step + 1
            history.append(result)
            bar.write(f"step {step + 1}: held-out loss {result['loss']:.3f}, top-1 agreement "
                      + " ".join(f"{a:.2f}" for a in result["agreement"]))
            if on_eval is not None:
                on_eval(step + 1, result, _snapshot(la, step + 1, steps_before, objective, seq_len, lr,
                                                    batch_size, history))
    return _snapshot(la, steps, steps_before, objective, seq_len, lr, batch_size, history)


def _snapshot(la, steps_done, steps_before, objective, seq_len, lr, batch_size, history) -> LookaheadEmbeddings:
    """A CPU copy of the embeddings with the training facts in its meta."""
    meta = dict(la.meta, objective=objective, steps=steps_before + steps_done, seq_len=seq_len, lr=lr,
                batch_size=batch_size, history=history[-5:])
    return LookaheadEmbeddings(la.weight.detach().cpu(), la.fingerprint, meta)


@torch.no_grad()
def evaluate(model, la, seqs, block, k, objective="kl", batch_size=4) -> dict:
    dev = model.device
    losses, agrees = [], []
    for i in range(0, len(seqs), batch_size):
        batch = torch.tensor(seqs[i: i + batch_size], device=dev)
        loss, agree = lookahead_loss(model, la, batch, block, k, objective)
        losses.append(loss.item())
        agrees.append(agree)
    return {"loss": sum(losses) / len(losses), "agreement": torch.stack(agrees).mean(0).tolist()}


def _as_sequences(model, data, seq_len: int, name: str) -> list:
    if isinstance(data, torch.Tensor):
        data = data.tolist()
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"{name} must be a list of texts or of token-id sequences, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")
    if isinstance(data[0], str):
        if model.tokenizer is None:
            raise ValueError(f"{name} holds texts but the model has no tokenizer: pass token-id sequences")
        seqs = token_chunks(model.tokenizer, data, seq_len)
    else:
        seqs = [list(s)[:seq_len] for s in data if len(s) >= seq_len]
    if not seqs:
        raise ValueError(f"{name} holds no sequence of {seq_len} tokens")
    vocab = model.config.vocab_size
    for s in seqs:
        for t in s:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"{name} holds token id {t!r}: token ids must be ints in [0, {vocab})")
    return seqs
