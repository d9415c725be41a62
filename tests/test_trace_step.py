"""bench/trace_step.py and the trace_buffer op: the slots of a replay parse into per-layer timelines, a build without
the trace marks says how to get them, and a bad buffer is refused with what it must be."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import pass_ext  # noqa: F401  (registers the ops)
from bench_scripts import BENCH, load_bench

SCRIPT = BENCH / "trace_step.py"
HAS_CUDA = pass_ext.ops.has_cuda_kernels() and torch.cuda.is_available()


def load():
    return load_bench("trace_step")


def slot(kind, blocks, marks, sms=None, points=16):
    """A slot of `blocks` blocks whose block i has point p at marks[p] + i (ns) and ran on SM sms[i] (default i)."""
    s = np.zeros((1024, points), dtype=np.int64)
    for i in range(blocks):
        for p, t in marks.items():
            s[i, p] = t + i
        s[i, points - 1] = kind | (i if sms is None else sms[i]) << 8
    return s


def test_launches_and_layers_from_synthetic_slots():
    t = load()
    lin = lambda t0: slot(2, 4, {0: t0, 1: t0 + 100, 4: t0 + 1000})  # noqa: E731
    att = lambda t0: slot(1, 3, {0: t0, 1: t0 + 50, 2: t0 + 300, 3: t0 + 400, 4: t0 + 600})  # noqa: E731
    seq = []
    for layer in range(3):  # qkv, attention, o per layer, 10 us apart
        base = 10_000 * layer
        seq += [lin(base), att(base + 1_200), lin(base + 2_000)]
    buf = np.stack(seq + [np.zeros((1024, t.POINTS), dtype=np.int64)])  # an unused slot at the end
    launches = t.launches(buf)
    assert [d["kind"] for d in launches] == [2, 1, 2] * 3
    assert launches[1][1] == (1_250, 1_252) and launches[1][4] == (1_800, 1_802) and launches[1]["blocks"] == 3
    rows = t.layer_rows(launches)
    # Layers 1 and 2 (layer 0 follows the embedding): each relative to its qkv's first wait.
    qkv, att, o = (rows[k] for k in (("att-1", t.KINDS[2]), ("att", t.KINDS[1]), ("att+1", t.KINDS[2])))
    assert qkv["wait (first)"] == [0, 0] and qkv["end (last)"] == [903, 903] and qkv["body"] == [903, 903]
    assert att["wait (first)"] == [1_150, 1_150] and att["handoff"] == [1_250 - 1_003] * 2
    assert att["keys done (last)"] == [1_402, 1_402] and att["rows merged (last)"] == [1_502, 1_502]
    assert att["body"] == [1_802 - 1_250] * 2 and o["handoff"] == [2_100 - 1_802] * 2
    assert qkv["blocks (count)"] == [4, 4] and qkv["blocks sharing an SM (count)"] == [0, 0]


def test_blocks_sharing_an_sm():
    """SM 0 (its kind word's bits above the low 8, which hold the kind) holds two blocks, SM 5 three, SM 7 one."""
    t = load()
    buf = np.stack([slot(2, 6, {0: 0, 1: 10, 4: 100}, sms=[0, 5, 0, 5, 7, 5])])
    (d,) = t.launches(buf)
    assert d["kind"] == 2 and d["blocks"] == 6 and d["sms"] == 3 and d["shared"] == 5


def test_trace_buffer_without_the_marks():
    """A default build: trace_buffer(None) says it has no marks, and a buffer is refused with how to get them."""
    if torch.ops.pass_ext.trace_buffer(None):
        pytest.skip("this is a trace build")
    with pytest.raises(RuntimeError, match="PASS_EXT_TRACE=1"):
        torch.ops.pass_ext.trace_buffer(torch.zeros(8192, dtype=torch.int64))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and a CUDA build")
def test_trace_buffer_checks_the_buffer_cuda():
    if not torch.ops.pass_ext.trace_buffer(None):
        pytest.skip("not a trace build")
    for bad in (torch.zeros(8192, dtype=torch.int32, device="cuda"), torch.zeros(100, dtype=torch.int64, device="cuda"),
                torch.zeros(8192, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="buf must be a contiguous int64 CUDA tensor"):
            torch.ops.pass_ext.trace_buffer(bad)


def test_trace_step_refuses_what_it_cannot_trace():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "no-such-model"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "--model must be one of the random-weight presets" in proc.stderr
    if not (HAS_CUDA and torch.ops.pass_ext.trace_buffer(None)):
        proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "smollm2-135m-random"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode != 0
        assert "needs a GPU and a CUDA build" in proc.stderr or "PASS_EXT_TRACE=1" in proc.stderr
