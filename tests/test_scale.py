"""The issue's scale bound: a Qwen2.5-0.5B-shaped MoTE (24 layers, 4 routed experts) loads within 8 GB of peak memory.

Writes ~3.5 GB to /tmp (removed afterwards) and takes a minute or two per layout, so it only runs with
MOTE_SCALE_TEST=1 (the small writer test below always runs):

    MOTE_SCALE_TEST=1 .venv/bin/python -m pytest tests/test_scale.py -q -s
"""
import json
import os
import subprocess
import sys

import pytest

needs_opt_in = pytest.mark.skipif(
    os.environ.get("MOTE_SCALE_TEST") != "1",
    reason="scale check (writes a 3.5 GB Qwen2.5-0.5B-shaped MoTE to /tmp, ~2 min): set MOTE_SCALE_TEST=1 to run it",
)


@needs_opt_in
@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_qwen25_05b_shaped_mote_loads_within_8_gib(layout):
    # Its own process, so the peak RSS of the loading child is not mixed up with anything this test run spawned.
    proc = subprocess.run([sys.executable, "-m", "mote.tools.scale_check", "--layout", layout, "--limit-gib", "8"],
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["peak_rss_gib"] <= 8.0
    assert result["parameters_loaded"] == result["parameters"] > 1.7e9


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_scale_check_writer_small(tmp_path, layout):
    """Always runs (fast): the scale check's tensor-by-tensor writer, on a small config, in both layouts."""
    import torch

    from mote.export.loader import load_model
    from mote.tools.make_random_model import random_config
    from mote.tools.scale_check import loaded_weights, write_model

    cfg = random_config(hidden=32, layers=3, heads=4, kv_heads=2, intermediate=48, experts=4,
                        expert_intermediate=40, vision=False)
    facts = write_model(tmp_path / layout, cfg, seed=3, layout=layout)
    assert facts["files"] == (4 if layout == "sharded" else 1)
    assert (tmp_path / layout / "model.safetensors.index.json").exists() == (layout == "sharded")
    model = load_model(tmp_path / layout)
    assert loaded_weights(model) == facts["parameters"]
    assert facts["bytes_on_disk"] == 2 * facts["parameters"]
    # both layouts hold the same weights (same seed, same order)
    other = "single" if layout == "sharded" else "sharded"
    write_model(tmp_path / other, cfg, seed=3, layout=other)
    ref = load_model(tmp_path / other)
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
