"""End-to-end generation speed: Hugging Face generate and every pass_ext method on the same real prompts (held-out
HumanEval code and Shakespeare), greedy and T=0.8/top-k 10 (and, with --settings, T=0.8 alone: generate's
defaults), batch 1 to 64. Random-weight Llama/Qwen shapes of 1B, 8B and 14B give step costs only; their tokens/s
are projected with the tokens per forward of the real models.

    python bench/bench_generate.py                                    # everything, merged into generate.json
    python bench/bench_generate.py --report-only --readme             # tables + plot from the JSON alone

Each run measures only its own rows and merges them into bench/results/generate.json, so the matrix can be
measured in parts (--models, --rows, --batches, --settings) in any order; projections are recomputed from
whatever the file holds. --max-minutes stops starting new measurements once a part has used its time. On an
H200, in three parts of under four minutes each (random models last: they reuse the k that lookahead="auto"
chose on the real ones):

    python bench/bench_generate.py --models smollm2-135m --hf-batches 1 --max-minutes 3.5
    python bench/bench_generate.py --models qwen2.5-coder-1.5b --hf-batches 1 --max-minutes 3.6
    python bench/bench_generate.py --models llama-3.2-1b,llama-3.1-8b,qwen2.5-14b --repeats 2 --max-minutes 3.5

CPU check at toy sizes: --device cpu --new 8 --batches 1,2 --tiny (random presets shrunk), --rows ours to
leave out transformers' rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import inspect
import json
import math
import os
import statistics
import sys
import time
from typing import Optional

import torch

import pass_ext
from pass_ext.lookahead import LookaheadEmbeddings
from pass_ext.presets import PRESETS, random_model

SCHEMA = "pass_ext.bench_generate/1"
BANDWIDTH = 4.24e12   # bytes/s, H200 copy bandwidth (DESIGN §6): weight bytes / BANDWIDTH is the ideal AR step
# "T0.8" is temperature alone (top-k and top-p off: generate's defaults), measured when asked for (--settings).
SETTINGS = {"greedy": dict(temperature=0.0), "T0.8/top-k10": dict(temperature=0.8, top_k=10),
            "T0.8": dict(temperature=0.8, top_k=0)}
DEFAULT_SETTINGS = "greedy,T0.8/top-k10"
OURS = ("ar", "draft", "pass-paper", "pass", "pass-auto", "pass-tree", "pass-tree-auto")
HF = ("hf-eager", "hf-static", "hf-pld", "hf-assisted")
METHOD_ORDER = OURS + HF
REAL_DRAFT = {"smollm2-135m": None, "qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}  # real model -> its draft model
RANDOM_DRAFT = {"llama-3.1-8b": "llama-3.2-1b", "qwen2.5-14b": "qwen2.5-0.5b"}    # vocabulary forced equal
ACCEPTANCE_FROM = ("qwen2.5-coder-1.5b", "smollm2-135m")  # whose tokens per forward projections use, in order
DEFAULT_MODELS = "smollm2-135m,qwen2.5-coder-1.5b,llama-3.2-1b,llama-3.1-8b,qwen2.5-14b"
# --tiny: random presets shrunk to a CPU-sized model of the same kind (GQA, bias, tying as the preset has them).
TINY = dict(num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16,
            vocab_size=512, max_position_embeddings=2048)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generate.json")
ROW_FIELDS = dict(projected=False, status="ok", note="", new_tokens=None, k=None, tokens_per_s=None,
                  tokens_per_s_runs=None, speedup_vs_ar=None, decode_tokens_per_s=None, decode_speedup_vs_ar=None,
                  tokens_per_forward=None, acceptance_by_position=None, step_s=None, roofline_pct=None,
                  differing_rows=None, rows_compared=None, near_ties=None, max_tie_ulps=None,
                  within_rounding=None, max_gap_over_error=None, tpf_source=None, auto_inputs=None, draft_tree=None)
NEAR_TIE_ULPS = 4  # a divergence is a near-tie when the two tokens' logits lie within this many bf16/fp16 ulps


# ---- small helpers -------------------------------------------------------------------------------------------
def auto_inputs(model, batch: int, sampled: bool) -> dict:
    """What lookahead='auto' decided from, for a batch and setting: the step costs it measured per context
    bucket (ms per step, k 0 = plain decoding), the running acceptance per draft position after the timed calls,
    the batch efficiency (pass_ext.autotune.record_efficiency), and the per-step speed-up over k = 0 it predicts
    for each k (the batch's expected tokens per step over the step cost; auto also rounds steps per call),
    to compare with the measured speed-up of the row."""
    from pass_ext import autotune
    acceptance = autotune.acceptance_of(model.lookahead, sampled)
    base = autotune.base_tokens("pass")  # the auto rows run fused PaSS
    costs: dict = {}
    for (method, b, ctx, samp, k), sec in model.__dict__.get("step_costs", {}).items():
        if b == batch and samp == sampled and method in ("ar", "pass"):
            costs.setdefault(ctx, {})[k] = sec
    eff = autotune.efficiency_of(model, sampled, batch)
    predicted = {ctx: {k: round(autotune.batch_tokens(acceptance or [], k, base, eff) * c[0] / sec, 3)
                       for k, sec in sorted(c.items())} for ctx, c in costs.items() if 0 in c}
    return dict(step_ms={ctx: {k: round(sec * 1e3, 4) for k, sec in sorted(c.items())} for ctx, c in costs.items()},
                acceptance=[round(a, 4) for a in acceptance] if acceptance else None, batch_efficiency=round(eff, 4),
                predicted_speedup=predicted)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """(wall seconds, fn()) with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@contextlib.contextmanager
def without_eos(*models):
    """transformers' generate fills an eos_token_id left None in the GenerationConfig it is given from the model's own
    generation_config, so an Instruct model stops at its EOS: a sampled call then emits a few tokens where ours emit
    max_new_tokens, and the long-minus-short decode rate is meaningless. Inside this, the models have no EOS."""
    saved = [(m, m.generation_config.eos_token_id) for m in models if m is not None]
    try:
        for m, _ in saved:
            m.generation_config.eos_token_id = None
        yield
    finally:
        for m, eos in saved:
            m.generation_config.eos_token_id = eos


def median(xs: list) -> float:
    return float(statistics.median(xs))


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm and the output projection. An untied
    input embedding is only gathered (B rows), so it does not count; tied, it is read once as the lm_head."""
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("lookahead"))
    if model.lm_head is not None:
        total -= model.embed_tokens.numel() * model.embed_tokens.element_size()
    return total


def interleave(code: list, english: list) -> list:
    """code0, english0, code1, english1, ...: a batch of B takes the first B (half code, half English)."""
    out = []
    for i in range(max(len(code), len(english))):
        out += code[i: i + 1] + english[i: i + 1]
    return out


def random_prompts(vocab_size: int, n: int, seed: int) -> list:
    """n token-id lists of ragged lengths 96..223 (about the real prompts' lengths): random models need the
    context length right, not the content."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (96 + (37 * i) % 128,), generator=g).tolist() for i in range(n)]


def divergence_logits(model, prompts: list, got_rows: list, want_rows: list, only=None) -> list:
    """(row, the reference token's logit, the other token's logit) at the first position where a row's tokens differ
    from the reference's, from a plain forward of the common prefix; rows where one is a prefix of the other (a
    stop, not a choice) are skipped, and with `only` (row indices) every row not in it."""
    out = []
    for r, (prompt, got, want) in enumerate(zip(prompts, got_rows, want_rows)):
        i = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), None)
        if i is None or (only is not None and r not in only):
            continue
        prefix = list(prompt) + list(want[:i])
        with torch.no_grad():  # the prefix but its last token in chunks (the kernel's limit), then that one
            cache = model.new_cache(1, len(prefix) + 1)
            last = importlib.import_module("pass_ext.generate").prefill(model, cache, [prefix], 128)
            pos = torch.tensor([[len(prefix) - 1]], device=model.device)
            logits = model(last[None], pos, cache)[0, -1].float()
        out.append((r, logits[want[i]].item(), logits[got[i]].item()))
    return out


def ulps_apart(a: float, b: float, dtype: torch.dtype) -> float:
    """|a - b| in ulps of `dtype` at the larger magnitude."""
    return abs(a - b) / (2.0 ** (math.frexp(max(abs(a), abs(b), 1e-30))[1] - 1) * torch.finfo(dtype).eps)


def divergence_ulps(model, prompts: list, got_rows: list, want_rows: list) -> list:
    """For each row whose tokens differ from the reference's: how far apart the two chosen tokens' logits are at the
    first differing position (`divergence_logits`), in ulps of the model's dtype at their magnitude. Within
    NEAR_TIE_ULPS, a different order of rounding (another batch shape, another kernel) can pick either: a near-tie,
    not a bug."""
    return [ulps_apart(a, b, model.dtype) for _, a, b in divergence_logits(model, prompts, got_rows, want_rows)]


def within_rounding_error(exact, prompts: list, got_rows: list, want_rows: list, low: list) -> list:
    """For divergences past NEAR_TIE_ULPS, given as `divergence_logits` entries of the bf16/fp16 model (`low`): the
    two tokens' logit gap in `exact` (the same weights in float32) over the error of that forward on the two logits,
    |a16 - a32| + |b16 - b32|. Up to 1 the true gap is smaller than what the model's dtype gets wrong at that
    position, so another order of rounding can rank the two either way."""
    logits16 = {r: (a, b) for r, a, b in low}
    ratios = []
    for r, a32, b32 in divergence_logits(exact, prompts, got_rows, want_rows, only=set(logits16)):
        a16, b16 = logits16[r]
        error = abs(a16 - a32) + abs(b16 - b32)
        ratios.append(abs(a32 - b32) / error if error > 0 else math.inf)
    return ratios


def failure(e: Exception) -> tuple[str, str]:
    """(status, note) of a call that raised: a refused request is 'n/a', anything else an 'error'."""
    status = "n/a" if isinstance(e, (ValueError, TypeError, NotImplementedError)) else "error"
    return status, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:240]


def our_kwargs(method: str, k: int, a, draft) -> dict:
    if method == "ar":
        return dict(method="ar")
    if method == "draft":
        return dict(method="draft", lookahead=a.draft_k, draft_model=draft)
    if method == "pass-auto":
        return dict(method="pass", lookahead="auto")
    if method == "pass-tree":
        return dict(method="pass-tree", lookahead=a.tree_k, draft_tree=a.tree)
    if method == "pass-tree-auto":
        return dict(method="pass-tree", lookahead="auto")
    return dict(method=method, lookahead=k)


class PrefillHook:
    """Wraps pass_ext.generate's prefill step. "time": adds its wall time to `seconds`, so a call's decode time
    is the rest. "skip" (random weights only): commits each prompt's length without running it; the cache
    contents do not change a step's cost, only its length does, and a 64-row batch skips 64 prefill forwards.
    `active` is False (and nothing is patched) when generate's prefill is not the expected function."""

    def __init__(self, mode: str, device: torch.device):
        self.mode, self.device, self.seconds, self.active = mode, device, 0.0, False
        self.module = importlib.import_module("pass_ext.generate")
        self.original = getattr(self.module, "prefill", None)

    def __enter__(self) -> "PrefillHook":
        if self.original is None or list(inspect.signature(self.original).parameters) != [
                "model", "cache", "rows", "chunk", "graphs"]:
            return self
        original = self.original

        def timed_prefill(model, cache, rows, chunk, graphs=None):
            dt, c = timed(self.device, lambda: original(model, cache, rows, chunk, graphs))
            self.seconds += dt
            return c

        def lengths_only(model, cache, rows, chunk, graphs=None):
            dev = cache.lens.device
            cache.lens.copy_(torch.tensor([len(r) - 1 for r in rows], dtype=cache.lens.dtype, device=dev))
            return torch.tensor([r[-1] for r in rows], dtype=torch.long, device=dev)

        self.module.prefill = timed_prefill if self.mode == "time" else lengths_only
        self.active = True
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.module.prefill = self.original
            self.active = False


# ---- results file --------------------------------------------------------------------------------------------
def row_key(r: dict) -> tuple:
    return (r["model"], r["method"], r["setting"], r["batch"])


def step_key(s: dict) -> tuple:
    return (s["model"], s["method"], s["setting"], s["batch"], s["k"])


def empty_results() -> dict:
    return dict(schema=SCHEMA, bandwidth_bytes_per_s=BANDWIDTH, runs=[], models={}, prompts={}, rows=[],
                step_costs=[], ar_tokens={})


def load_results(path: str) -> dict:
    if not os.path.isfile(path):
        return empty_results()
    with open(path) as f:
        res = json.load(f)
    if res.get("schema") != SCHEMA:
        raise SystemExit(f"{path} is not a {SCHEMA} file; pass --fresh to start a new one")
    res["rows"] = [r for r in res["rows"] if not r.get("projected")]  # recomputed by finalize
    return res


def save_results(res: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)  # a part killed mid-write leaves the previous file whole


def upsert(items: list, new: dict, key) -> None:
    items[:] = [r for r in items if key(r) != key(new)] + [new]


def merge_results(res: dict, other: dict) -> None:
    """Fold another part's file into `res` (parts measured at the same time, e.g. on two GPUs of one host):
    its measured rows and step costs replace the same keys, its runs, models and prompts are added."""
    for r in other["rows"]:
        if not r.get("projected"):
            upsert(res["rows"], r, row_key)
    for sc in other["step_costs"]:
        upsert(res["step_costs"], sc, step_key)
    res["runs"] += [r for r in other["runs"] if r not in res["runs"]]
    for field in ("models", "prompts", "ar_tokens"):
        res[field].update(other.get(field) or {})


# ---- the measurements ----------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, results: dict):
        self.args, self.res = args, results
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, args.dtype) if args.dtype else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.t0 = time.perf_counter()
        self.warmed: set = set()
        self.skipped: list = []
        self.tie_model = None  # (our model, prompts) of the real model being measured: explains divergences
        self.tie_exact = None  # () -> the same weights in float32, made when a divergence is past NEAR_TIE_ULPS
        self.settings = [s for s in args.settings.split(",") if s]
        self.batches = [int(b) for b in args.batches.split(",") if b]
        self.hf_batches = [int(b) for b in args.hf_batches.split(",") if b and int(b) in self.batches]
        self.rows = expand_rows(args.rows)
        self.lookahead_files = dict(spec.split("=", 1) for spec in args.lookahead_file)
        self.short = max(1, min(8, args.new // 2))  # warm-up length, and HF's short call

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {text}", flush=True)

    def out_of_time(self, what: str) -> bool:
        if self.args.max_minutes is None or self.elapsed() < 60 * self.args.max_minutes:
            return False
        self.skipped.append(what)
        self.log(f"skipped (--max-minutes): {what}")
        return True

    def save(self) -> None:
        finalize(self.res)
        save_results(self.res, self.args.out)

    def record(self, row: dict) -> None:
        upsert(self.res["rows"], row, row_key)
        self.save()
        shown = f"{row['tokens_per_s']:.1f} tok/s" if row["tokens_per_s"] else row["status"]
        decode = f", decode {row['decode_tokens_per_s']:.1f} tok/s" if row["decode_tokens_per_s"] else ""
        tpf = f", {row['tokens_per_forward']:.2f} tok/fwd" if row["tokens_per_forward"] else ""
        note = f" ({row['note']})" if row["note"] else ""
        self.log(f"{row['model']} {row['setting']} B={row['batch']} {row['method']}: {shown}{decode}{tpf}{note}")

    def generate(self, model, ids, setting: str, new: int, **kw):
        return pass_ext.generate(model, ids, max_new_tokens=new, eos_token_id=False, seed=self.args.seed,
                                 **SETTINGS[setting], **kw)

    def warm(self, key: tuple, fn) -> None:
        """One warm-up call per key (model, method, batch[, setting or k]) before timing."""
        if key not in self.warmed:
            fn()
            self.warmed.add(key)

    def run(self) -> None:
        for name in [m for m in self.args.models.split(",") if m]:
            if self.out_of_time(f"model {name}"):
                continue
            if name in REAL_DRAFT:
                self.run_real(name)
            else:
                self.run_random(name)
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def describe(self, name: str, model, kind: str, draft: Optional[str]) -> None:
        c, la = model.config, model.lookahead
        self.res["models"][name] = dict(
            kind=kind, arch=c.arch, layers=c.num_layers, hidden_size=c.hidden_size, heads=c.num_heads,
            kv_heads=c.num_kv_heads, vocab_size=c.vocab_size, weight_bytes=weight_bytes(model),
            params=sum(p.numel() for n, p in model.named_parameters() if not n.startswith("lookahead")),
            dtype=str(self.dtype).replace("torch.", ""), draft=draft,
            lookahead=None if la is None or kind == "random" else dict(k=la.k, fingerprint=la.fingerprint))

    # -- real models --
    def load_real(self, name: str, tokenizer: bool = True):
        """The transformers model (weights read once, from the cached GGUF), ours built from its tensors, and
        (if asked) the tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pass_ext import registry
        if not self.args.fetch and not registry.cached_path(name).is_file():
            # Without a network, a fetch would spend minutes in pip's retries before failing.
            raise FileNotFoundError(f"{registry.cached_path(name)} is missing (set PASS_EXT_CACHE to where the GGUF "
                                    f"files are, or pass --fetch to download them)")
        path = registry.fetch(name)
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=self.dtype,
                                                  local_files_only=True).to(self.device).eval()
        ours = pass_ext.load_model(hf, dtype=self.dtype, device=self.device)
        if name in self.lookahead_files:
            pass_ext.load_lookahead(ours, self.lookahead_files[name])
        tok = None
        if tokenizer:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        return hf, ours, tok

    def run_real(self, name: str) -> None:
        want_draft = bool(REAL_DRAFT[name] and {"draft", "hf-assisted"} & set(self.rows))
        self.log(f"loading {name}" + (f" and {REAL_DRAFT[name]}" if want_draft else ""))
        try:
            hf, ours, tok = self.load_real(name)
            hf_draft = draft = None
            if want_draft:
                hf_draft, draft, _ = self.load_real(REAL_DRAFT[name], tokenizer=False)
        except (OSError, ValueError, RuntimeError) as e:  # the other models can still be measured
            self.skipped.append(f"model {name}: {failure(e)[1]}")
            self.log(f"skipped {name}: {failure(e)[1]}")
            return
        self.measure_real(name, hf, ours, tok, hf_draft, draft, draft_name=REAL_DRAFT[name])
        if "hf-static" in self.rows:
            torch._dynamo.reset()  # compiled HF forwards hold on to their model: let it go with the rest

    def measure_real(self, name, hf, ours, tok, hf_draft=None, draft=None, draft_name=None) -> None:
        """Every requested row of one real model: ours (`ours`, `draft`: pass_ext Models) and transformers'
        (`hf`, `hf_draft`: the same weights) on the held-out prompts encoded by `tok`."""
        self.describe(name, ours, "real", draft_name if draft is not None or hf_draft is not None else None)
        prompts = self.res["prompts"]
        enc = [tok(t, add_special_tokens=False)["input_ids"][-self.args.prompt_tokens:]
               for t in interleave(prompts["code"], prompts["english"])]
        k = min(self.args.k, ours.lookahead.k) if ours.lookahead is not None else self.args.k
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.tie_model = (ours, enc)
        self.tie_exact = (functools.cache(lambda: pass_ext.load_model(hf, dtype=torch.float32, device=self.device))
                          if self.dtype != torch.float32 else None)
        for B in self.batches:  # batch-major: with --max-minutes, the batches listed first are measured whole
            for setting in self.settings:
                for method in [m for m in OURS if m in self.rows and (m != "draft" or draft is not None)]:
                    if not self.out_of_time(f"{name} {setting} B={B} {method}"):
                        self.record(self.measure_ours(name, ours, enc[:B], method, setting, k, draft))
                if B not in self.hf_batches or hf is None:
                    continue
                for mode in [m for m in HF if m in self.rows and (m != "hf-assisted" or hf_draft is not None)]:
                    if not self.out_of_time(f"{name} {setting} B={B} {mode}"):
                        self.record(self.measure_hf(name, hf, enc[:B], mode, setting, pad, hf_draft))

    def base_row(self, name: str, method: str, setting: str, B: int) -> dict:
        return {**dict(model=name, method=method, setting=setting, batch=B), **ROW_FIELDS,
                "new_tokens": self.args.new, "tokens_per_s_runs": []}

    def agreement(self, row: dict, new_tokens: list) -> None:
        """Greedy rows: how many rows' tokens differ from our ar's (in bf16 a few near-ties are expected)."""
        if row["setting"] != "greedy":
            return
        key = f"{row['model']}|{row['batch']}"
        if row["method"] == "ar":
            self.res["ar_tokens"][key] = new_tokens
        ref = self.res["ar_tokens"].get(key)
        if ref is None:
            row["note"] = (row["note"] + "; " if row["note"] else "") + "no ar tokens to compare with"
            return
        row["differing_rows"] = sum(a != b for a, b in zip(new_tokens, ref))
        row["rows_compared"] = len(ref)
        if row["differing_rows"] and self.tie_model is not None:
            self.explain_divergences(row, new_tokens, ref)

    def explain_divergences(self, row: dict, new_tokens: list, ref: list) -> None:
        """The rows that differ from ar, measured in ulps (`divergence_logits`): within NEAR_TIE_ULPS, a near-tie; past
        it (in bf16/fp16), against float32 (`within_rounding_error`): a gap smaller than the forward's own error."""
        model, prompts = self.tie_model
        found = divergence_logits(model, prompts, new_tokens, ref)
        ulps = [ulps_apart(a, b, model.dtype) for _, a, b in found]
        row["near_ties"] = sum(u <= NEAR_TIE_ULPS for u in ulps)
        row["max_tie_ulps"] = round(max(ulps), 2) if ulps else None
        past = [f for f, u in zip(found, ulps) if u > NEAR_TIE_ULPS]
        if past and self.tie_exact is not None:  # the rest, against the same weights in float32
            ratios = within_rounding_error(self.tie_exact(), prompts, new_tokens, ref, past)
            row["within_rounding"] = sum(x <= 1.0 for x in ratios)
            row["max_gap_over_error"] = round(max(ratios), 3)

    def measure_ours(self, name, model, ids, method, setting, k, draft) -> dict:
        a, B, dev = self.args, len(ids), self.device
        row = self.base_row(name, method, setting, B)
        kw = our_kwargs(method, k, a, draft)
        runs = []
        try:
            with PrefillHook("time", dev) as hook:
                # Warm up with the timed call itself: the first call of a shape captures its CUDA graph (and auto
                # times its candidate steps); the timed calls replay it, as repeated calls of a server do.
                self.warm((name, method, B, setting), lambda: self.generate(model, ids, setting, a.new, **kw))
                for _ in range(a.repeats):
                    hook.seconds = 0.0
                    t, out = timed(dev, lambda: self.generate(model, ids, setting, a.new, **kw))
                    runs.append((t, t - hook.seconds if hook.active else None, out))
        except Exception as e:  # noqa: BLE001 - a refused or failed row is recorded, the rest goes on
            row["status"], row["note"] = failure(e)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            return row
        out = runs[0][2]
        tokens = int(out.num_new_tokens.sum())
        row.update(k=out.stats.k, tokens_per_s_runs=[tokens / t for t, _, _ in runs],
                   tokens_per_forward=out.stats.tokens_per_forward, forward_passes=out.stats.forward_passes,
                   acceptance_by_position=out.stats.acceptance_by_position,
                   draft_tree=[list(p) for p in out.stats.draft_tree] if out.stats.draft_tree else None)
        row["tokens_per_s"] = median(row["tokens_per_s_runs"])
        if method == "pass-auto":
            row["auto_inputs"] = auto_inputs(model, B, setting != "greedy")
        if runs[0][1] is not None:  # decode time = the call minus its (timed) prefill
            decode = median([d for _, d, _ in runs])
            row["decode_tokens_per_s"] = tokens / decode
            if method == "ar":
                self.roofline(row, decode / out.stats.forward_passes)
        self.agreement(row, [t.tolist() for t in out.new_tokens])
        return row

    def roofline(self, row: dict, step_s: float) -> None:
        row["step_s"] = step_s
        row["roofline_pct"] = 100 * self.res["models"][row["model"]]["weight_bytes"] / BANDWIDTH / step_s

    def measure_hf(self, name, hf, ids, mode, setting, pad, hf_draft) -> dict:
        from transformers import GenerationConfig
        a, B, dev = self.args, len(ids), self.device
        row = self.base_row(name, mode, setting, B)
        width = max(len(r) for r in ids)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids], device=dev)  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=dev)

        def call(new: int, setting: str):
            sample = SETTINGS[setting]["temperature"] > 0
            cfg = GenerationConfig(max_new_tokens=new, do_sample=sample, pad_token_id=pad, eos_token_id=None,
                                   **(dict(SETTINGS[setting], top_p=1.0) if sample else {}))
            if mode == "hf-static":
                cfg.cache_implementation = "static"  # generate compiles the decode step itself (CUDA)
            if mode == "hf-pld":
                cfg.prompt_lookup_num_tokens = a.pld_tokens
            torch.manual_seed(a.seed)
            extra = dict(assistant_model=hf_draft) if mode == "hf-assisted" else {}
            with torch.no_grad(), without_eos(hf, hf_draft):
                out = hf.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg, **extra)
            if out.shape[1] != width + new:  # our rows emit exactly `new` tokens: so must these, or they compare nothing
                raise RuntimeError(f"generate returned {out.shape[1] - width} new tokens, asked for {new}")
            return out

        try:
            # The static cache keeps the largest size asked for: warming (and compiling) at full length lets
            # the short calls below reuse the same shapes.
            # Per setting: sampling changes generate's decode step, and a first sampled call would compile (static
            # cache) inside the timed runs.
            self.warm((name, mode, B, setting), lambda: call(a.new if mode == "hf-static" else self.short, setting))
            runs = [timed(dev, lambda: call(a.new, setting)) for _ in range(a.repeats)]
            short = [timed(dev, lambda: call(self.short, setting))[0] for _ in range(a.repeats)]
        except Exception as e:  # noqa: BLE001
            row["status"], row["note"] = failure(e)
            return row
        new_tokens = [r[width:].tolist() for r in runs[0][1].cpu()]
        tokens = sum(len(r) for r in new_tokens)
        row["tokens_per_s_runs"] = [tokens / t for t, _ in runs]
        row["tokens_per_s"] = median(row["tokens_per_s_runs"])
        # decode: the difference to a short call cancels the prefill (HF runs it batched, in one forward)
        dt = median([t for t, _ in runs]) - median(short)
        if dt > 0 and a.new > self.short:
            row["decode_tokens_per_s"] = B * (a.new - self.short) / dt
            if mode in ("hf-eager", "hf-static"):  # plain decoding: one token per forward
                row["tokens_per_forward"] = 1.0
                self.roofline(row, dt / (a.new - self.short))
        self.agreement(row, new_tokens)
        return row

    # -- random-weight models: step cost only --
    def run_random(self, preset: str) -> None:
        a = self.args
        over = TINY if a.tiny else {}
        name = preset + ("@tiny" if a.tiny else "")
        self.log(f"building random {name} ({self.dtype}) on {self.device}")
        model = random_model(preset, self.device, self.dtype, seed=a.seed, **over)
        draft = None
        if "draft" in self.rows and preset in RANDOM_DRAFT:
            draft = random_model(RANDOM_DRAFT[preset], self.device, self.dtype, seed=a.seed + 1,
                                 **{**over, "vocab_size": model.config.vocab_size})
        self.describe(name, model, "random", RANDOM_DRAFT[preset] if draft is not None else None)
        prompts = random_prompts(model.config.vocab_size, max(self.batches), a.seed)
        jobs = [("ar", 0)] if "ar" in self.rows else []
        jobs += [("draft", a.draft_k)] if draft is not None else []
        jobs += [(m, a.k) for m in ("pass-paper", "pass") if m in self.rows]
        if "pass-auto" in self.rows:  # projected with the k that auto chose on a real model (if one ran yet)
            ks = [int(k) for k in a.pass_ks.split(",") if k] if a.pass_ks else sorted(auto_ks(self.res))
            jobs += [("pass", k) for k in ks if k > 0 and ("pass", k) not in jobs]
        # Untrained embeddings: drafts from random weights mean nothing, only the step's shape matters here.
        model.lookahead = LookaheadEmbeddings.init(model, max([a.k] + [k for _, k in jobs]), seed=a.seed).to(
            self.device)
        with PrefillHook("skip", self.device) as hook:
            if not hook.active:
                self.log("generate's prefill hook changed: timing with the real prefill (slower, same result)")
            for B in self.batches:
                for setting in self.settings:
                    for method, k in jobs:
                        if not self.out_of_time(f"{name} {setting} B={B} {method} k={k} step cost"):
                            self.measure_step(name, model, prompts[:B], method, setting, k, draft)

    def measure_step(self, name, model, ids, method, setting, k, draft) -> None:
        """Seconds per target forward at this batch: two calls of different lengths, differenced, so that setup
        and prefill cancel. Forwards are counted by generate (acceptance may vary)."""
        a, B, dev = self.args, len(ids), self.device
        kw = our_kwargs(method, k, a, draft)
        sc = dict(model=name, method=method, setting=setting, batch=B, k=k, status="ok", note="", step_s=None)
        try:
            for n in (a.random_short, a.random_new):  # both timed shapes, so the timed calls replay their graphs
                self.warm((name, method, B, k, setting, n), lambda: self.generate(model, ids, setting, n, **kw))
            short, long = [], []
            for _ in range(a.repeats):
                short.append(timed(dev, lambda: self.generate(model, ids, setting, a.random_short, **kw)))
                long.append(timed(dev, lambda: self.generate(model, ids, setting, a.random_new, **kw)))
        except Exception as e:  # noqa: BLE001
            sc["status"], sc["note"] = failure(e)
        else:
            fp_s, fp_l = short[0][1].stats.forward_passes, long[0][1].stats.forward_passes
            t_s, t_l = median([t for t, _ in short]), median([t for t, _ in long])
            sc.update(forwards_short=fp_s, forwards_long=fp_l, seconds_short=t_s, seconds_long=t_l)
            if fp_l > fp_s and t_l > t_s:
                sc["step_s"] = (t_l - t_s) / (fp_l - fp_s)
            else:
                sc.update(status="error", note=f"no usable difference: {fp_s}/{fp_l} forwards in {t_s:.4f}/{t_l:.4f} s")
        upsert(self.res["step_costs"], sc, step_key)
        self.save()
        shown = f"{1e3 * sc['step_s']:.2f} ms/forward" if sc["step_s"] else f"{sc['status']} ({sc['note']})"
        self.log(f"{name} {setting} B={B} {method} k={k}: {shown}")


def expand_rows(spec: str) -> list:
    groups = {"all": METHOD_ORDER, "ours": OURS, "hf": HF}
    out = []
    for item in filter(None, spec.split(",")):
        if item not in groups and item not in METHOD_ORDER:
            raise SystemExit(f"unknown row {item!r}: use all, ours, hf or some of {', '.join(METHOD_ORDER)}")
        out += [m for m in groups.get(item, (item,)) if m not in out]
    return out


def auto_ks(res: dict) -> set:
    """The k that lookahead='auto' chose on real models so far: random models need step costs at those k."""
    return {r["k"] for r in res["rows"] if r["method"] == "pass-auto" and r["status"] == "ok" and r.get("k")}


# ---- projections and speed-ups -------------------------------------------------------------------------------
def finalize(res: dict) -> None:
    """Recompute the projection rows (random-weight step cost x a real model's tokens per forward) and every
    row's speed-ups over our ar of the same model, setting and batch."""
    rank = {m: i for i, m in enumerate(res.get("acceptance_from") or ACCEPTANCE_FROM)}
    real = [r for r in res["rows"] if not r.get("projected")]
    tried = {step_key(s): s for s in res["step_costs"]}
    costs = {key: s for key, s in tried.items() if s["status"] == "ok" and s["step_s"]}

    def source(method, setting, batch, k):
        """The real row whose tokens per forward stand in: preferred model first, then the nearest batch."""
        cands = [r for r in real if (r["method"], r["setting"], r["status"]) == (method, setting, "ok")
                 and r["tokens_per_forward"] and (k is None or r["k"] == k)
                 and res["models"].get(r["model"], {}).get("kind") == "real"]
        cands.sort(key=lambda r: (rank.get(r["model"], len(rank)), abs(math.log2(r["batch"] / batch)), r["batch"]))
        return cands[0] if cands else None

    projected = []
    for model, setting, B in sorted({(s["model"], s["setting"], s["batch"]) for s in res["step_costs"]}):
        for method in OURS:
            if method == "ar":
                k, src, timed_as = 0, None, (model, "ar", setting, B, 0)
                if timed_as not in tried:
                    continue
            elif method == "pass-auto":  # the k auto chose on the real model, timed here as pass (or ar)
                src = source(method, setting, B, None)
                if src is None:
                    continue
                k = src["k"]
                timed_as = (model, "pass", setting, B, k) if k else (model, "ar", setting, B, 0)
            else:
                ks = sorted(key[4] for key in tried if key[:4] == (model, method, setting, B))
                if not ks:
                    continue  # not timed on this model
                k = next((k for k in ks if (model, method, setting, B, k) in costs and source(method, setting, B, k)),
                         ks[0])
                src, timed_as = source(method, setting, B, k), (model, method, setting, B, k)
            row = {**dict(model=model, method=method, setting=setting, batch=B), **ROW_FIELDS,
                   "projected": True, "k": k}
            cost = costs.get(timed_as)
            if cost is None:
                row.update(status="n/a", note=f"step cost: {tried[timed_as]['note']}" if timed_as in tried
                           else f"no step cost timed for {timed_as[1]} k={k}")
            elif method != "ar" and src is None:
                row.update(status="n/a", note=f"no tokens per forward of {method} k={k} from a real model yet")
            else:
                tpf = 1.0 if src is None else src["tokens_per_forward"]
                row.update(step_s=cost["step_s"], tokens_per_forward=tpf, decode_tokens_per_s=B * tpf / cost["step_s"])
                if src is not None:
                    row.update(tpf_source=f"{src['model']} B={src['batch']}",
                               note=f"projected: tok/fwd of {src['model']} B={src['batch']}")
                else:
                    weights = res["models"].get(model, {}).get("weight_bytes")
                    row.update(note="projected: step cost on random weights",
                               roofline_pct=100 * weights / BANDWIDTH / cost["step_s"] if weights else None)
            projected.append(row)
    res["rows"] = real + projected
    for field, speedup in (("tokens_per_s", "speedup_vs_ar"), ("decode_tokens_per_s", "decode_speedup_vs_ar")):
        ar = {(r["model"], r["setting"], r["batch"]): r[field] for r in res["rows"] if r["method"] == "ar"}
        for r in res["rows"]:
            base = ar.get((r["model"], r["setting"], r["batch"]))
            r[speedup] = r[field] / base if base and r[field] else None


# ---- tables and plot -----------------------------------------------------------------------------------------
def sorted_rows(res: dict) -> list:
    models, settings = list(res["models"]), list(SETTINGS)
    return sorted(res["rows"], key=lambda r: (models.index(r["model"]) if r["model"] in models else len(models),
                                              settings.index(r["setting"]) if r["setting"] in settings else 9,
                                              r["batch"], METHOD_ORDER.index(r["method"])))


def label(res: dict, r: dict) -> tuple[str, str]:
    random_weights = res["models"].get(r["model"], {}).get("kind") == "random"
    method = r["method"] + (f" k={r['k']}" if r["k"] and r["method"] != "ar" else "") + (" *" if r["projected"] else "")
    return r["model"] + (" (random)" if random_weights else ""), method


def rate(x: Optional[float], empty: str = "") -> str:
    if x is None:
        return empty
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def ratio(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def markdown_table(res: dict) -> str:
    lines = ["| model | setting | B | method | tok/s | × ar | decode tok/s | × ar | tok/fwd | roofline | ≠ ar "
             "| note |", "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in sorted_rows(res):
        model, method = label(res, r)
        roof = "" if r["roofline_pct"] is None else f"{r['roofline_pct']:.{0 if r['roofline_pct'] >= 10 else 1}f}%"
        diff = f"{r['differing_rows']}/{r['rows_compared']}" if r["rows_compared"] else ""
        if r.get("near_ties") is not None:
            more = f", {r['within_rounding']} within rounding" if r.get("within_rounding") else ""
            diff += f" ({r['near_ties']} near-tie{'s' if r['near_ties'] != 1 else ''}{more})"
        status = "" if r["status"] == "ok" else r["status"]
        lines.append(f"| {model} | {r['setting']} | {r['batch']} | {method} | {rate(r['tokens_per_s'], status)} | "
                     f"{ratio(r['speedup_vs_ar'])} | {rate(r['decode_tokens_per_s'], status)} | "
                     f"{ratio(r['decode_speedup_vs_ar'])} | {ratio(r['tokens_per_forward'])} | {roof} | {diff} | "
                     f"{r['note']} |")
    lines += ["", "tok/s: new tokens of all rows / wall time of the call, prefill included (median of the repeats); "
              "decode tok/s: the same without the prefill (ours: the call minus its timed prefill; HF: difference "
              "to a short call). * projected: decode step cost measured on random weights of that shape × tokens "
              "per forward measured on the real model named in the note. roofline: ideal step (weight bytes / "
              f"{BANDWIDTH / 1e12:.2f} TB/s) / measured decode step. ≠ ar: greedy rows whose tokens differ from "
              f"our ar's; near-ties: of those, the rows whose two tokens at the first difference score within "
              f"{NEAR_TIE_ULPS} ulps of the model's dtype in a plain forward of the common prefix; within rounding: "
              f"of the rest, those whose two logits in float32 lie closer than that forward's error on them."]
    return "\n".join(lines)


def readme_table(res: dict) -> str:
    """Per setting, one line per (model, method): decode tok/s and its speed-up over ar at each batch size."""
    batches = sorted({r["batch"] for r in res["rows"]})
    meta = res["runs"][-1] if res["runs"] else {}
    out = []
    for setting in SETTINGS:
        rows = [r for r in sorted_rows(res) if r["setting"] == setting]
        if not rows:
            continue
        news = sorted({r["new_tokens"] for r in rows if r["new_tokens"]})
        out += [f"{setting}, {'/'.join(map(str, news))} new tokens per row, {meta.get('device', '?')}, "
                f"{meta.get('dtype', '?')}: decode tokens/s (speed-up over pass_ext ar)", "",
                "| model | method | " + " | ".join(f"B={b}" for b in batches) + " |",
                "|---|---|" + "--:|" * len(batches)]
        lines = {}
        for r in rows:
            cell = r["status"] if r["decode_tokens_per_s"] is None else rate(r["decode_tokens_per_s"]) + (
                f" ({r['decode_speedup_vs_ar']:.2f}×)" if r["decode_speedup_vs_ar"] and r["method"] != "ar" else "")
            lines.setdefault(label(res, r), {})[r["batch"]] = cell
        out += [f"| {m} | {meth} | " + " | ".join(cells.get(b, "") for b in batches) + " |"
                for (m, meth), cells in lines.items()]
        out.append("")
    out.append("\\* projected: step cost on random weights of that shape × the tokens per forward of a real model. "
               "hf-*: transformers generate (eager dynamic cache; static cache, compiled; prompt lookup; assisted "
               "by the 0.5B).")
    return "\n".join(out)


def plot(res: dict, path: str) -> Optional[str]:
    """Decode speed-up over our ar against batch size, one panel per (setting, model). Returns a problem or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (run --report-only where it is)"
    models = [m for m in res["models"] if any(r["model"] == m for r in res["rows"])]
    if not models:
        return "no rows to plot"
    batches = sorted({r["batch"] for r in res["rows"]})
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in res["rows"])]
    fig, axes = plt.subplots(len(settings), len(models), figsize=(3.4 * len(models) + 0.6, 3.3 * len(settings)),
                             squeeze=False, sharey=True)
    for i, setting in enumerate(settings):
        for j, model in enumerate(models):
            ax = axes[i][j]
            for method in METHOD_ORDER:
                pts = sorted((r["batch"], r["decode_speedup_vs_ar"]) for r in res["rows"]
                             if (r["model"], r["setting"], r["method"]) == (model, setting, method)
                             and r["decode_speedup_vs_ar"])
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="--" if method.startswith("hf") else "-", label=method)
            ax.axhline(1.0, color="gray", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.minorticks_off()
            random_weights = res["models"][model].get("kind") == "random"
            ax.set_title(f"{model}{' (random, projected)' if random_weights else ''}\n{setting}", fontsize=9)
            ax.set_xlabel("batch")
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("decode tokens/s ÷ pass_ext ar")
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    width, height = fig.get_size_inches()
    ncol = max(1, min(len(handles), int(width / 1.2)))  # about 1.2 inches per entry: the legend stays on the figure
    rows = -(-len(handles) // ncol)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, min(0.4, (0.1 + 0.2 * rows) / height), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ---- command line --------------------------------------------------------------------------------------------
def load_prompts(args, stored: dict) -> dict:
    """Held-out prompts: HumanEval (code) and the Shakespeare works never trained on (English), half a batch
    each. The results file's own prompts win (every part of a run uses the same ones), then --prompts-file."""
    n = max(32, (max(int(b) for b in args.batches.split(",") if b) + 1) // 2)  # B=64, whatever this part runs
    if stored and not args.prompts_file and min(len(stored["code"]), len(stored["english"])) >= n:
        return stored
    if args.prompts_file:
        with open(args.prompts_file) as f:
            data = json.load(f)
        code, english = data.get("prompts", data)["code"], data.get("prompts", data)["english"]
    else:
        from pass_ext import corpora
        held = [t for i, t in enumerate(corpora.shakespeare()) if i % 8 == 7]  # as corpora.splits() holds out
        code, english = corpora.humaneval_prompts(), corpora.english_prompts(held, n)
    if len(code) < n or len(english) < n:
        raise SystemExit(f"need {n} code and {n} English prompts, have {len(code)} and {len(english)}")
    return dict(code=code[:n], english=english[:n])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"real: {', '.join(REAL_DRAFT)}; random presets: {', '.join(PRESETS)}")
    ap.add_argument("--rows", default="all", help=f"all, ours, hf, or some of {', '.join(METHOD_ORDER)}")
    ap.add_argument("--batches", default="1,64,8,32", help="measured in this order")
    ap.add_argument("--hf-batches", default="1,8", help="batch sizes (of --batches) that also run the HF rows")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help=f"some of {', '.join(SETTINGS)} (default {DEFAULT_SETTINGS})")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row (real models)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per row, after one warm-up call")
    ap.add_argument("--k", type=int, default=4, help="look-ahead tokens of pass / pass-paper")
    ap.add_argument("--draft-k", type=int, default=4, help="drafts per step of the draft method")
    ap.add_argument("--tree-k", type=int, default=1, help="depth (look-ahead tokens) of pass-tree's draft tree")
    ap.add_argument("--tree", type=int, default=None,
                    help="draft nodes of pass-tree (default: generate's, the likeliest paths filling 8 rows)")
    ap.add_argument("--pass-ks", default="",
                    help="random models: k of pass to time for the pass-auto projections (default: the k that "
                         "auto chose on the real models in --out; give them when the parts run at the same time)")
    ap.add_argument("--pld-tokens", type=int, default=10, help="HF prompt_lookup_num_tokens")
    ap.add_argument("--prompt-tokens", type=int, default=256, help="prompts are cut to their last N tokens")
    ap.add_argument("--random-new", type=int, default=32, help="new tokens of the long call (random models)")
    ap.add_argument("--random-short", type=int, default=8, help="new tokens of the short call (random models)")
    ap.add_argument("--lookahead-file", action="append", default=[], metavar="MODEL=FILE",
                    help="look-ahead embeddings for a real model that ships none (repeatable)")
    ap.add_argument("--acceptance-from", default=None,
                    help=f"real models whose tokens per forward the projections use, in order (default "
                         f"{','.join(ACCEPTANCE_FROM)}; kept in the JSON)")
    ap.add_argument("--fetch", action="store_true", help="download real models missing from the cache")
    ap.add_argument("--tiny", action="store_true", help="shrink the random presets to CPU size (tests)")
    ap.add_argument("--prompts-file", default=None,
                    help="JSON with 'prompts': {code: [...], english: [...]}, e.g. an earlier results file of this "
                         "script (its runs then share their prompts; needed where the corpora cannot be fetched)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new measurement after this long")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    ap.add_argument("--fresh", action="store_true", help="start a new JSON instead of merging into --out")
    ap.add_argument("--merge", action="append", default=[], metavar="FILE",
                    help="fold the measurements of another part's JSON into --out first (parts run in parallel)")
    ap.add_argument("--report-only", action="store_true", help="measure nothing: tables and plot from --out")
    ap.add_argument("--readme", action="store_true", help="also print the summary table for the README")
    args = ap.parse_args(argv)
    for s in args.settings.split(","):
        if s and s not in SETTINGS:
            ap.error(f"unknown setting {s!r}: {', '.join(SETTINGS)}")
    for m in filter(None, args.models.split(",")):
        if m not in REAL_DRAFT and m not in PRESETS:
            ap.error(f"unknown model {m!r}: real models {', '.join(REAL_DRAFT)}; random presets {', '.join(PRESETS)}")
    for spec in args.lookahead_file:
        if "=" not in spec or spec.split("=", 1)[0] not in REAL_DRAFT:
            ap.error(f"--lookahead-file takes MODEL=FILE with MODEL one of {', '.join(REAL_DRAFT)}, got {spec!r}")
    if min(args.new, args.repeats, args.random_short) < 1 or args.random_new <= args.random_short:
        ap.error("--new, --repeats and --random-short must be >= 1, and --random-new > --random-short")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = empty_results() if args.fresh else load_results(args.out)
    if args.acceptance_from:
        res["acceptance_from"] = args.acceptance_from.split(",")
    for path in args.merge:
        merge_results(res, load_results(path))
    if not args.report_only:
        if any(m in REAL_DRAFT for m in args.models.split(",")):
            res["prompts"] = load_prompts(args, res["prompts"])
        bench = Bench(args, res)
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        bench.run()
        dev = bench.device
        res["runs"].append(dict(
            started=started, wall_s=bench.elapsed(), skipped=bench.skipped,
            argv=list(sys.argv[1:] if argv is None else argv),
            device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            dtype=str(bench.dtype).replace("torch.", ""), torch=torch.__version__,
            transformers=importlib.import_module("transformers").__version__, build=pass_ext.build_info(),
            fused_chains=pass_ext.model.fusion_enabled(),
            decode_linear=dict(max_rows=pass_ext.ops.linear_max_rows(), max_mib=pass_ext.ops.linear_max_bytes() >> 20,
                               one_row_max_mib=pass_ext.ops.linear_one_row_max_bytes() >> 20,
                               fuse_norm=pass_ext.ops.linear_fuses_norm())))
    finalize(res)
    if not args.report_only or args.merge:
        save_results(res, args.out)
    png = args.plot or os.path.splitext(args.out)[0] + ".png"
    problem = plot(res, png)
    print()
    print(markdown_table(res))
    if args.readme:
        print()
        print(readme_table(res))
    print(f"\n{args.out}" + (f"\n{png}" if problem is None else f"\n({problem})"))
    return res


if __name__ == "__main__":
    main()
