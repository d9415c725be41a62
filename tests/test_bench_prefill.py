"""bench/bench_prefill.py: bad arguments are named; on a GPU both prefill modes run and replayed chunks leave the
call's output unchanged."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pass_ext

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_prefill.py"


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("argv, message", [
    (["--models", "nope"], "--models: unknown presets ['nope']"),
    (["--batches", "x"], "argument --batches: must be positive integers"),
    (["--prompts", "0"], "argument --prompts: must be positive integers"),
    (["--repeats", "0"], "--new and --repeats must be >= 1"),
    (["--new", "1,2"], "argument --new: invalid int value: '1,2'"),
    (["--profile", "-1"], "--profile must be >= 0 (0: off), got -1"),
])
def test_bench_prefill_names_bad_arguments(argv, message):
    proc = run(*argv)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and pass_ext.ops.has_cuda_kernels()),
                    reason="needs a CUDA GPU and the CUDA kernels")
def test_bench_prefill_on_a_gpu(tmp_path):
    out = tmp_path / "prefill.json"
    proc = run("--models", "smollm2-135m-random", "--batches", "2", "--prompts", "40,200", "--new", "8",
               "--repeats", "2", "--profile", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    # 39 prompt tokens to prefill: one chunk padded to 48; 199: 128, then 71 padded to 80
    assert [(r["batch"], r["prompt"], r["graphs"]) for r in rows] == [(2, 40, 1), (2, 200, 2)]
    assert all(r["eager_ms"] > 0 and r["graphs_ms"] > 0 and r["call_graphs_ms"] > 0 for r in rows)
    # the profile: 199 tokens are two chunks, each with kernels that took time
    head = next(line for line in proc.stdout.splitlines() if line.startswith("smollm2-135m-random B=2 prompt=200"))
    assert "2 chunks" in head and float(head.split("kernels ")[1].split()[0]) > 0, head
