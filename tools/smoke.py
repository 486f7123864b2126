"""The on-device smoke test: a saved artifact run by its runtime on a device (tools/devices.py) on the verification
inputs the host recorded, scored against the reference at the same bars as on the host (DESIGN.md section 6).

    host    ReferenceRecord -> inputs.npz (export.verify.device_inputs)
    device  targets/on_device.py + targets/<backend>/device_runner.py: the artifact in the device's runtime,
            outputs.npz (each program's result, the logits of every teacher-forced decoder call, the runtime's
            description and wall times)
    host    export.verify.score against the record; the result is report.json's `on_device` section

No torch runs on the device, and the reference never leaves the host: the device sees inputs only.
"""
from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from mote.export.errors import MoteError
from mote.export.verify import device_inputs, device_outputs, passed, score

ON_DEVICE = Path(__file__).resolve().parents[1] / "targets" / "on_device.py"
TIMEOUT_S = 1800


class SmokeTestError(MoteError):
    """The artifact did not run on the device (the runtime's own last lines say why)."""

    exit_code = 1


def smoke_test(target, artifact_dir: Path, record, tolerance, device, host_numerics: dict | None = None) -> dict:
    """Run `artifact_dir` (a `target` export) on `device` on `record`'s inputs; the `on_device` section of
    report.json. `host_numerics`: the host runtime's own numerics on the same record, to show where the device's
    kernels depart from the host's."""
    if target.device_runner is None:
        raise SmokeTestError(f"--target {target.name} has no runtime for {device.arch} devices")
    with tempfile.TemporaryDirectory(prefix="mote-smoke-") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "inputs.npz", **device_inputs(record))
        (tmp / "options.json").write_text(json.dumps(device.runner_options()))
        out = tmp / "outputs.npz"
        device_out = device.output_path(out)
        argv = [device.push(ON_DEVICE), device.push(target.device_runner), device.push(artifact_dir),
                device.push(tmp / "options.json"), device.push(tmp / "inputs.npz"), device_out]
        t0 = time.perf_counter()
        try:
            done = device.run_python(argv, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise SmokeTestError(f"the {target.name} artifact did not finish on the {device.name} device within "
                                 f"{TIMEOUT_S} s") from None
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:]
            raise SmokeTestError(f"the {target.name} artifact failed on the {device.name} device "
                                 f"(exit {done.returncode}): {tail[0] if tail else 'no message'}")
        with np.load(device.pull(device_out, out)) as arrays:
            arrays = dict(arrays)
    runtime = json.loads(str(arrays.pop("runtime_json")))
    numerics = score(record, device_outputs(arrays))
    ok, why = passed(numerics, tolerance)
    section = {"device": device.describe(), "runtime": runtime, "numerics": numerics,
               "bar": {"min_sqnr_db": tolerance.min_sqnr_db, "need_identical_greedy": tolerance.need_identical_greedy},
               "passed": ok, "wall_s": round(wall, 2)}
    if not ok:
        section["failure"] = why
    if host_numerics:
        section["vs_host"] = {}
        for program, stats in numerics.items():
            if program not in host_numerics:
                continue
            host = host_numerics[program]
            both = {"host_sqnr_db": host["sqnr_db"], "device_sqnr_db": stats["sqnr_db"]}
            if "greedy_match" in stats:   # only the decoder generates tokens
                both["same_greedy"] = stats["greedy_match"] == host.get("greedy_match")
            section["vs_host"][program] = both
    return section
