"""bench/bench_attention.py's target summary: a bandwidth row names the FLOP rate its target implies (useful q.k and
p.v work at 3.8 TB/s), against the dense bf16 peak."""
from bench_scripts import load_bench


def row(B, L, Q, us, tbps, G=4, Hkv=8, D=128):
    keys = B * (L + Q)
    flops = 4 * Q * G * D * keys * Hkv
    nbytes = 2 * keys * Hkv * D * 2  # K and V in bf16 (q and out left out: a round number for the test)
    return {"layout": "llama3-8b", "dtype": "bf16", "B": B, "L": L, "Q": Q, "bytes": nbytes,
            "prediction": {"flops": flops}, "results": {"pass_ext": {"us": us, "tbps": tbps}}}


def test_needed_flops_and_the_summary(capsys):
    t = load_bench("bench_attention")
    q64 = row(8, 4096, 64, 180.0, 0.61)
    # 256 rows x 128 channels x 4 FLOPs per key and head over 512 bytes per key and head: 256 FLOP per byte.
    assert abs(t.needed_tflops(q64) - 256 * 3.8) < 1e-6
    t.targets([q64, row(8, 4096, 1, 40.0, 3.9), row(1, 4096, 1, 11.0, 0.5), row(1, 4096, 64, 99.0, 0.1)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(lines) == 3  # B = 1 at Q = 64 is not a target shape
    assert "MISSED" in lines[0] and "needs  973 TFLOP/s, 98% of the dense bf16 peak" in lines[0]
    assert " met " in lines[1] and "needs   15 TFLOP/s" in lines[1]
    assert lines[2].endswith("met")
