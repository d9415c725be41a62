"""bench/profile_step.py on CPU: the tiny preset runs through the timing, the kernel profile and the in-process
A/B (--ab), and a bad --ab spec names what it takes."""
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "profile_step.py"
BASE = [sys.executable, str(SCRIPT), "--model", "smollm2-135m-random", "--tiny", "--device", "cpu",
        "--short", "2", "--long", "4"]


def run(*argv):
    return subprocess.run([*BASE, *argv], capture_output=True, text=True, timeout=600)


def test_profile_step_on_cpu():
    proc = run("--top", "3")
    assert proc.returncode == 0, proc.stderr
    assert "ms/forward with graphs" in proc.stdout and "aten ops (self CPU time)" in proc.stdout


def test_profile_step_ab_alternates_settings_in_one_process():
    proc = run("--ab", "PASS_EXT_PREFETCH=0", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    rounds = [line for line in proc.stdout.splitlines() if line.startswith("round ")]
    # ABBA: neither setting always runs first
    assert [line.split(":")[1].split()[0] for line in rounds] == ["default", "PASS_EXT_PREFETCH=0",
                                                                   "PASS_EXT_PREFETCH=0", "default"]
    assert all("ms/step replayed" in line for line in rounds)
    assert "medians of 2 rounds: default" in proc.stdout and "replayed step: default" in proc.stdout


def test_profile_step_ab_rejects_a_bad_spec():
    for spec in ("PREFETCH=0", "PASS_EXT_PREFETCH"):
        proc = run("--ab", spec)
        assert proc.returncode != 0 and "--ab takes PASS_EXT_NAME=VALUE[,...]" in proc.stderr, proc.stderr
