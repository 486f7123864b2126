"""The issue's scale bound: a Qwen2.5-0.5B-shaped MoTE (24 layers, 4 routed experts) loads within 8 GB of peak memory.

Writes ~3.5 GB to /tmp and takes a minute or two, so it only runs with MOTE_SCALE_TEST=1:

    MOTE_SCALE_TEST=1 .venv/bin/python -m pytest tests/test_scale.py -q -s
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("MOTE_SCALE_TEST") != "1",
    reason="scale check (writes a 3.5 GB Qwen2.5-0.5B-shaped MoTE, ~2 min): set MOTE_SCALE_TEST=1 to run it",
)


def test_qwen25_05b_shaped_mote_loads_within_8_gib():
    # Its own process, so the peak RSS of the loading child is not mixed up with anything this test run spawned.
    proc = subprocess.run([sys.executable, "-m", "mote.tools.scale_check", "--limit-gib", "8"],
                          capture_output=True, text=True, timeout=1800)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["peak_rss_gib"] <= 8.0
    assert result["parameters_loaded"] == result["parameters"] > 1.7e9
