"""bench/bench_stop_checks.py: bad arguments are named; on a GPU both stop-check schedules give the same tokens and
count the same forwards, and the IF node's late checks leave the GPU less idle between steps."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pass_ext

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "bench_stop_checks.py"


def run(*argv):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("argv, message", [
    (["--models", "nope"], "--models: unknown presets ['nope']"),
    (["--sync-every", "x"], "--sync-every must be positive integers"),
    (["--sync-every", "0"], "must be positive"),
    (["--new", "0"], "must be positive"),
])
def test_bench_stop_checks_names_bad_arguments(argv, message):
    proc = run(*argv)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and pass_ext.ops.has_cuda_kernels()),
                    reason="needs a CUDA GPU and the CUDA kernels")
def test_bench_stop_checks_on_a_gpu(tmp_path):
    out = tmp_path / "stop.json"
    proc = run("--models", "smollm2-135m-random", "--new", "24", "--repeats", "2", "--sync-every", "2",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["same_tokens"] and row["all_tokens"]
    b, f = row["blocking"], row["if-node"]
    assert b["forward_passes"] == f["forward_passes"] >= 24
    assert f["replays"] > b["replays"]  # the IF graph's are queued one check ahead
    assert f["idle_ms"] < b["idle_ms"]
