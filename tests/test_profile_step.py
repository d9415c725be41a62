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


def test_profile_step_without_attention_replaces_its_calls():
    """--without attention: the other arm's attention calls become a zero fill (counted), alone or beside --ab."""
    for extra in ((), ("--ab", "PASS_EXT_PREFETCH=0")):
        proc = run("--without", "attention", "--rounds", "2", *extra)
        assert proc.returncode == 0, proc.stderr
        label = ",".join([*extra[1:], "without attention"])
        rounds = [line.split(":", 1)[1].strip().split("  ")[0] for line in proc.stdout.splitlines()
                  if line.startswith("round ")]
        assert rounds == ["default", label, label, "default"]
        replaced = [line for line in proc.stdout.splitlines() if line.startswith("attention calls replaced")]
        assert replaced and int(replaced[0].split(":")[1]) > 0
        assert "replayed step: default" in proc.stdout and f", {label} " in proc.stdout
