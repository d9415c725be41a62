"""bench/bench_sampling.py's target summary: each latency row names its read floor (the logits once at the copy
roofline), and a target below that floor is reported as unreachable rather than merely missed."""
import os

import pytest
from bench_scripts import load_bench


def row(op, batch, k, us, nbytes, impl="pass_ext", vocab=151936, roofline=4.24):
    tbps = nbytes / (us * 1e-6) / 1e12
    return dict(op=op, batch=batch, vocab=vocab, k=k, impl=impl, us=us, tbps=tbps, pct_roofline=100 * tbps / roofline)


def test_read_floor_and_unreachable_targets(capsys):
    t = load_bench("bench_sampling")
    logits = lambda b, k: b * (k + 1) * 151936 * 2  # noqa: E731  (bf16 bytes of verify's k + 1 positions per row)
    rows = [row("verify", 32, 8, 223.0, logits(32, 8)), row("verify", 32, 4, 134.0, logits(32, 4)),
            row("sample", 1, 4, 14.0, 151936 * 2), row("verify", 128, 4, 443.0, logits(128, 4)),
            row("verify", 32, 4, 10.0, logits(32, 4), impl="compiled"), row("sample", 32, 4, 20.0, 1, vocab=49152)]
    assert abs(t.read_floor_us(rows[0]) - logits(32, 8) / 4.24e12 * 1e6) < 1e-6
    t.targets(rows)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 4  # the compiled row and the other vocabulary are not targets
    assert "read floor  20.6 µs   MISSED (unreachable" in lines[0]
    assert "read floor  11.5 µs   MISSED" in lines[1] and "unreachable" not in lines[1]
    assert lines[2].endswith("met")
    assert "%" in lines[3] and lines[3].endswith("MISSED")


def test_ab_settings_and_median_us_restore_the_environment(monkeypatch):
    """--ab of the profile scripts: the default plus the named switches; anything but PASS_EXT_NAME=VALUE pairs
    exits naming the flag. median_us sets the switches for its timing only (a CPU stand-in for time_us here)."""
    t = load_bench("bench_sampling")
    assert t.ab_settings(None) == [("default", {})]
    assert t.ab_settings("PASS_EXT_A=0,PASS_EXT_B=all") == [
        ("default", {}), ("PASS_EXT_A=0,PASS_EXT_B=all", {"PASS_EXT_A": "0", "PASS_EXT_B": "all"})]
    for bad in ("OTHER=1", "PASS_EXT_A", "PASS_EXT_A="):
        with pytest.raises(SystemExit, match="--ab takes"):
            t.ab_settings(bad)
    monkeypatch.setenv("PASS_EXT_B", "before")
    monkeypatch.delenv("PASS_EXT_A", raising=False)
    seen = []
    monkeypatch.setattr(t, "time_us", lambda call, n, flush: seen.append(dict(os.environ)) or 1.5)
    assert t.median_us(lambda: None, 3, {"PASS_EXT_A": "0", "PASS_EXT_B": "all"}, None) == 1.5
    assert seen[0]["PASS_EXT_A"] == "0" and seen[0]["PASS_EXT_B"] == "all"
    assert "PASS_EXT_A" not in os.environ and os.environ["PASS_EXT_B"] == "before"
