"""Smoke test of `mote-bench --target T --quick --profile` for every target of the registry: the table and JSON
structure, and that every ratio is computed from the measured numbers beside it. Never timing thresholds.

Each run lowers 4 tiny models (2 expert counts x ternary / fp32): ~25 s for onnx, ~80 s for android (ExecuTorch's
graph passes cost 15-25 s per model whatever its size) on 2 idle cores, about twice that on busy ones.
"""
import json
import math
from importlib.metadata import PackageNotFoundError

import pytest

from mote.targets import REGISTRY, get_target
from mote.tools import bench


def _toolchain_missing(name: str) -> bool:
    try:
        get_target(name).runtime_versions()   # the versions of the packages it runs with
    except (ImportError, PackageNotFoundError):
        return True
    return False


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_bench_quick_structure(name, tmp_path, capsys):
    if _toolchain_missing(name):
        pytest.skip(f"{name}: toolchain not installed")
    work, out = tmp_path / "work", tmp_path / "bench.json"
    work.mkdir()
    assert bench.main(["--target", name, "--quick", "--profile", "--json", str(out), "--work-dir", str(work)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    mode = bench.MODES["quick"]
    shape, = mode.shapes
    threads = list(bench.DEFAULT_THREADS)

    assert result["target"] == name and result["settings"]["mode"] == "quick"
    assert result["settings"]["threads"] == threads
    assert result["settings"]["options"] == get_target(name).Options.for_benchmark().as_dict()
    assert set(get_target(name).runtime_versions()) <= set(result["settings"]["versions"])

    # one row per expert count, both variants lowered and measured in each
    assert [(r["config"], r["experts"]) for r in result["rows"]] == [(shape.name, e) for e in shape.experts]
    for r in result["rows"]:
        t, f = r["ternary"], r["fp32"]
        for v in (t, f):
            assert v["routed_expert_weights"] == (
                shape.layers * r["experts"] * 3 * shape.hidden * shape.expert_intermediate)
            assert v["artifact_bytes"] == sum(v["artifacts"].values()) > v["routed_expert_bytes"] > 0
            assert v["bits_per_weight"] == v["routed_expert_bytes"] * 8 / v["routed_expert_weights"]
            assert v["reported_matches_artifact"]   # what lower() reported is what the artifact holds
        # 2-bit codes + scales against floats as the target stores them: float32, or fp16 in an fp16 program (Core ML)
        assert 2.0 <= t["bits_per_weight"] < 2.6 and f["bits_per_weight"] in (16.0, 32.0)
        assert r["bits_ratio_fp32_over_ternary"] == f["bits_per_weight"] / t["bits_per_weight"]
        assert r["routed_expert_bytes_ratio_fp32_over_ternary"] == f["routed_expert_bytes"] / t["routed_expert_bytes"]
        assert r["artifact_bytes_ratio_fp32_over_ternary"] == f["artifact_bytes"] / t["artifact_bytes"]

        # latency: one entry per thread count, exactly the mode's sample counts (quick: no minimum time)
        assert [e["threads"] for e in r["latency"]] == threads
        for e in r["latency"]:
            for v in (e["ternary"], e["fp32"]):
                assert v["prefill_samples"] == mode.prefill_repeats and v["decode_samples"] == mode.decode_steps
                assert 0 < v["prefill_min_ms"] <= v["prefill_ms"] and 0 < v["decode_min_ms"] <= v["decode_ms"]
            assert e["prefill_ratio_fp32_over_ternary"] == e["fp32"]["prefill_ms"] / e["ternary"]["prefill_ms"]
            assert e["decode_ratio_fp32_over_ternary"] == e["fp32"]["decode_ms"] / e["ternary"]["decode_ms"]

    # expert-count scaling: smallest -> largest E, per variant and thread count, from the rows' own numbers
    small, big = result["rows"][0], result["rows"][-1]
    assert [(s["variant"], s["threads"], s["experts"], s["experts_scaled"]) for s in result["scaling"]] == [
        (v, n, small["experts"], big["experts"]) for v in bench.VARIANTS for n in threads]
    for s in result["scaling"]:
        i = threads.index(s["threads"])
        a, b = small["latency"][i][s["variant"]], big["latency"][i][s["variant"]]
        assert (s["decode_ms"], s["decode_ms_scaled"], s["prefill_ms"], s["prefill_ms_scaled"]) == (
            a["decode_ms"], b["decode_ms"], a["prefill_ms"], b["prefill_ms"])
        assert s["decode_ratio"] == b["decode_ms"] / a["decode_ms"]
        assert s["prefill_ratio"] == b["prefill_ms"] / a["prefill_ms"]
        sa, sb = small[s["variant"]], big[s["variant"]]
        assert s["routed_expert_bytes_ratio"] == sb["routed_expert_bytes"] / sa["routed_expert_bytes"]
        assert s["artifact_bytes_ratio"] == sb["artifact_bytes"] / sa["artifact_bytes"]

    # --profile: the runtime's own profiler over decode steps of both variants, smallest expert count only
    assert all("profile" not in r for r in result["rows"][1:])
    profile = small["profile"]
    assert (profile["threads"], profile["decode_steps"]) == (threads[0], mode.decode_steps)
    if profile["ternary"] is None:   # a runtime without a profiler says so
        assert profile["fp32"] is None and any("has no profiler" in n for n in result["notes"])
    else:
        kinds = {}
        for variant in bench.VARIANTS:
            ops = profile[variant]["ops"]
            assert ops and len({o["kind"] for o in ops}) == len(ops)          # summed by kind
            assert [o["ms_per_step"] for o in ops] == sorted((o["ms_per_step"] for o in ops), reverse=True)
            assert math.isclose(profile[variant]["profiled_ms_per_step"], sum(o["ms_per_step"] for o in ops))
            for o in ops:   # whole calls over the profiled steps
                assert o["calls_per_step"] > 0 and math.isclose(o["calls_per_step"] * mode.decode_steps,
                                                                round(o["calls_per_step"] * mode.decode_steps))
            kinds[variant] = {o["kind"] for o in ops}
        assert kinds["ternary"] != kinds["fp32"]   # the routed experts run as different operators

    # the printed tables are those of the JSON: a line per row, per row and thread count, per scaling record, per
    # profiled operator shown
    assert printed.strip() == bench.format_table(result)
    lines = printed.splitlines()
    n_rows = len(result["rows"])
    shown = sum(min(len(profile[v]["ops"]), bench.PROFILE_TOP) for v in bench.VARIANTS if profile[v] is not None)
    assert sum(line.startswith(shape.name) for line in lines) == (
        n_rows + n_rows * len(threads) + len(result["scaling"]) + shown)
    size_lines = [line for line in lines if line.startswith(shape.name)][:n_rows]
    for line, r in zip(size_lines, result["rows"]):
        assert line.endswith(f"{r['artifact_bytes_ratio_fp32_over_ternary']:.2f}")
    assert not any(work.iterdir())   # the lowered artifacts are cleaned up


def test_bench_quick_quantize(tmp_path, capsys):
    """`--quantize int4`: the ternary variant also has its full-precision parts quantized (as mote-export builds it),
    the fp32 baseline stays float32; the bytes a decode step reads follow the memory plan of each variant."""
    work, out = tmp_path / "work", tmp_path / "bench.json"
    work.mkdir()
    assert bench.main(["--target", "onnx", "--quick", "--quantize", "int4", "--threads", "1", "--json", str(out),
                       "--work-dir", str(work)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["settings"]["quantize"] == "int4" and "ternary + --quantize int4 vs all-fp32" in printed
    for r in result["rows"]:
        t, f = r["ternary"], r["fp32"]
        assert r["quantize"] == "int4"
        # attention and shared expert at 4 bits + a scale per 32 weights, the head at 8: far below float32
        assert 0 < t["dense_decode_bytes"] < f["dense_decode_bytes"] / 3
        assert t["artifact_bytes"] < f["artifact_bytes"] / 2
        assert r["decode_weight_bytes_ratio_fp32_over_ternary"] == bench.decode_weight_bytes(r, "fp32") / \
            bench.decode_weight_bytes(r, "ternary")
    assert any("--quantize int4 for the full-precision parts" in n for n in result["notes"])
