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
    objective: str = "ce",
    init: Optional[LookaheadEmbeddings] = None,
    eval_data: Optional[Sequence] = None,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = True,
    on_eval: Optional[Callable[[int, dict, LookaheadEmbeddings], None]] = None,
    time_limit: Optional[float] = None,
) -> LookaheadEmbeddings:
    """Train k look-ahead embeddings for a frozen `model`.

    Args:
        data: texts (tokenised with model.tokenizer) or token-id sequences; cut into seq_len-token pieces.
        objective: "ce" (cross-entropy on the data's next tokens; the default, chosen by measured acceptance, see
            bench/results/train_smollm2-135m.json) or "kl" (self-distillation to the model's own next-token
            distributions).
        init: embeddings to resume from (their first k rows; more rows are added if they hold fewer).
        eval_data: held-out sequences: loss and top-1 agreement per LA position are reported every eval_every steps.
        on_eval: called as on_eval(step, result, embeddings so far) after each evaluation (checkpointing).
        time_limit: seconds; training stops after the step that passes it (evaluated and checkpointed).
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
    if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
        raise ValueError(f"time_limit must be a number of seconds > 0 or None, got {time_limit!r}")
    bar = tqdm(range(steps), desc="train look-ahead", disable=not progress)
    history = []
    t_start = time.perf_counter()
    done = steps
    for step in bar:
        batch = torch.tensor([seqs[rnd.randrange(len(seqs))] for _ in range(batch_size)], device=dev)
        loss, agree = lookahead_loss(model, la, batch, block, k, objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=" ".join(f"{a:.2f}" for a in agree.tolist()[:4]))
        out_of_time = time_limit is not None and time.perf_counter() - t_start > time_limit
        if evals and ((step + 1) % eval_every == 0 or step + 1 == steps or out_of_time):
            result = evaluate(model, la, evals, block, k, objective, batch_size)
            result["step"] = step + 1
            history.append(result)
            bar.write(f"step {step + 1}: held-out loss {result['loss']:.3f}, top-1 agreement "
                      + " ".join(f"{a:.2f}" for a in result["agreement"]))
            if on_eval is not None:
                on_eval(step + 1, result, _snapshot(la, step + 1, steps_before, objective, seq_len, lr,
                                                    batch_size, history))
        if out_of_time:
            bar.write(f"time limit of {time_limit:.0f} s reached after {step + 1} of {steps} steps")
            done = step + 1
            break
    return _snapshot(la, done, steps_before, objective, seq_len, lr, batch_size, history)


def self_generated(model, texts: Sequence[str], n_seqs: int, *, prompt_len: int = 64, new_tokens: int = 192,
                   batch_size: int = 64, temperatures: Sequence[float] = (0.0, 0.8), top_k: int = 10,
                   seed: int = 0, progress: bool = True) -> list:
    """Token sequences of a random `prompt_len`-token window of `texts` followed by the model's own
    continuation (plain decoding, rows alternating between `temperatures`, top-k `top_k` when sampling).

    Look-ahead embeddings learn to predict what the model will say; its own text is exactly that, so this
    is the data distribution they meet when decoding. The prompts come from `texts` only (keep evaluation
    prompts out of them)."""
    from tqdm.auto import tqdm

    from .generate import generate
    if model.tokenizer is None:
        raise ValueError("self_generated needs a model with a tokenizer")
    if isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 1:
        raise ValueError(f"n_seqs must be an int >= 1, got {n_seqs!r}")
    rnd = random.Random(seed)
    texts = list(texts)
    texts = rnd.sample(texts, min(len(texts), 400))  # windows from a sample of documents: tokenising is slow
    stream = token_chunks(model.tokenizer, texts, prompt_len)
    if not stream:
        raise ValueError(f"texts hold no window of {prompt_len} tokens")
    out = []
    for start in tqdm(range(0, n_seqs, batch_size), desc="self-generated data", disable=not progress):
        n = min(batch_size, n_seqs - start)
        prompts = [stream[rnd.randrange(len(stream))] for _ in range(n)]
        temps = [float(temperatures[(start + i) % len(temperatures)]) for i in range(n)]
        res = generate(model, prompts, method="ar", max_new_tokens=new_tokens, temperature=temps,
                       top_k=[top_k if t > 0 else 0 for t in temps], seed=seed + start)
        for p, new in zip(prompts, res.new_tokens):
            out.append(list(p) + new.tolist())
    return out


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
    texts = [d for d in data if isinstance(d, str)]
    if texts and model.tokenizer is None:
        raise ValueError(f"{name} holds texts but the model has no tokenizer: pass token-id sequences")
    seqs = token_chunks(model.tokenizer, texts, seq_len) if texts else []
    # Token-id sequences (e.g. from self_generated) join the texts' pieces: each is cut into seq_len pieces.
    for s in data:
        if not isinstance(s, str):
            s = list(s)
            seqs += [s[i: i + seq_len] for i in range(0, len(s) - seq_len + 1, seq_len)]
    if not seqs:
        raise ValueError(f"{name} holds no sequence of {seq_len} tokens")
    vocab = model.config.vocab_size
    for s in seqs:
        for t in s:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise ValueError(f"{name} holds token id {t!r}: token ids must be ints in [0, {vocab})")
    return seqs
