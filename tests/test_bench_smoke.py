"""Smoke test of tools/bench_onnx.py in its smallest setting: structure only, never timing thresholds."""
import json
import math

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mote.tools import bench_onnx  # noqa: E402


def test_bench_onnx_smoke_structure(tmp_path):
    result = bench_onnx.run_benchmark("smoke", threads=1, work_dir=tmp_path)
    shape = bench_onnx.MODES["smoke"].shapes[0]

    # one row per (configuration, expert count), both variants measured in each
    assert [(r["config"], r["experts"]) for r in result["rows"]] == [(shape.name, e) for e in shape.experts]
    for r in result["rows"]:
        t, f = r["qmoe"], r["fp32"]
        assert t["expert_ops"] == ["QMoE"] and f["expert_ops"] == ["MoE"]
        assert t["routed_expert_weights"] == f["routed_expert_weights"] == (
            shape.layers * r["experts"] * 3 * shape.hidden * shape.expert_intermediate)
        # the ternary export stores 2-bit codes + block scales; the baseline float32
        assert t["bits_per_weight"] < f["bits_per_weight"] / 8
        assert f["bits_per_weight"] >= 32.0
        assert t["reported_matches_artifact"]
        assert t["blocks"] and 2.0 < t["bits_per_weight"] == pytest.approx(2 + 32 / t["blocks"][0])
        assert t["onnx_bytes"] < f["onnx_bytes"]
        for key in ("bits_ratio_fp32_over_ternary", "bytes_ratio_fp32_over_ternary",
                    "prefill_ratio_fp32_over_ternary", "decode_ratio_fp32_over_ternary"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        for v in (t, f):
            assert v["prefill_ms"] > 0 and v["decode_ms"] > 0

    # expert-count scaling: E -> 4E, one row per variant
    assert [(s["variant"], s["experts"], s["experts_scaled"]) for s in result["scaling"]] == [
        ("qmoe", shape.experts[0], shape.experts[-1]), ("fp32", shape.experts[0], shape.experts[-1])]
    for s in result["scaling"]:
        for key in ("decode_ratio", "prefill_ratio", "onnx_bytes_ratio"):
            assert math.isfinite(s[key]) and s[key] > 0, key

    # the printed table has a line per row and per scaling row, and names the fp32 baseline's routing weight
    table = bench_onnx.format_table(result)
    lines = table.splitlines()
    assert sum(line.startswith(shape.name) for line in lines) == len(result["rows"]) + len(result["scaling"])
    assert bench_onnx.FP32_ROUTING_NOTE in table
    assert result["settings"]["threads"]["intra_op"] == 1
    json.dumps(result)   # JSON-able as written by --json
    assert not any(tmp_path.iterdir())   # the lowered artifacts are cleaned up
