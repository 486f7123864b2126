"""Smoke test of tools/bench_executorch.py in its smallest setting: structure only, never timing thresholds.

One run lowers two tiny `.pte` files (ternary and fp32 experts), ~25 s on an idle 2-core machine.
"""
import copy
import json
import math

import pytest

pytest.importorskip("executorch.runtime")

from mote.tools import bench_executorch  # noqa: E402


def test_bench_executorch_smoke_structure(tmp_path):
    result = bench_executorch.run_benchmark("smoke", threads=1, work_dir=tmp_path)
    shape = bench_executorch.MODES["smoke"].shapes[0]

    # one row per (configuration, expert count), both variants measured in each
    assert [(r["config"], r["experts"]) for r in result["rows"]] == [(shape.name, e) for e in shape.experts]
    for r in result["rows"]:
        t, f = r["qmoe"], r["fp32"]
        assert t["routed_expert_weights"] == f["routed_expert_weights"] == (
            shape.layers * r["experts"] * 3 * shape.hidden * shape.expert_intermediate)
        # the ternary export stores 2-bit codes + scales, the baseline float32; the .pte holds what is reported
        assert 2.0 <= t["bits_per_weight"] < 2.5
        assert f["bits_per_weight"] == 32.0
        assert t["reported_matches_pte"] and f["reported_matches_pte"]
        assert t["code_bits_per_weight_in_pte"] == pytest.approx(2.0) and f["code_bits_per_weight_in_pte"] == 0
        assert t["pte_bytes"] < f["pte_bytes"]
        for key in ("bits_ratio_fp32_over_ternary", "bytes_ratio_fp32_over_ternary",
                    "prefill_ratio_fp32_over_ternary", "decode_ratio_fp32_over_ternary"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        for v in (t, f):
            assert v["prefill_ms"] > 0 and v["decode_ms"] > 0

    # the printed table has a line per row and names the fp32 baseline and the unoptimised ternary path
    table = bench_executorch.format_table(result)
    assert sum(line.startswith(shape.name) for line in table.splitlines()) == len(result["rows"])
    assert bench_executorch.FP32_BASELINE_NOTE in table and bench_executorch.TERNARY_PATH_NOTE in table
    assert result["settings"]["threads"] == 1
    json.dumps(result)   # JSON-able as written by --json
    assert not any(tmp_path.iterdir())   # the lowered artifacts are cleaned up

    # expert-count scaling (the smoke mode lowers one expert count; the real modes E and 4E): one row per variant
    assert result["scaling"] == []
    big = copy.deepcopy(result["rows"][0])
    big["experts"] *= 4
    scaling = bench_executorch.scaling_rows([result["rows"][0], big])
    assert [(s["variant"], s["experts_scaled"] // s["experts"]) for s in scaling] == [("qmoe", 4), ("fp32", 4)]
    for s in scaling:
        for key in ("decode_ratio", "prefill_ratio", "pte_bytes_ratio"):
            assert math.isfinite(s[key]) and s[key] > 0, key
