"""Runs on the device: a target's artifact on the verification inputs the host recorded, outputs back to the host.

    python3 on_device.py RUNNER_MODULE ARTIFACT_DIR OPTIONS_JSON INPUTS_NPZ OUTPUTS_NPZ

Only the standard library and numpy are imported here (a device has neither torch nor the `mote` package): the
target's runner module (`targets/<backend>/device_runner.py`) is loaded by its path and must keep to the same. It
defines `open_runner(artifact_dir, options) -> runner`, whose numpy methods mirror the host Runner protocol
(`targets/base.py`): reset(), vision_encoder(pixel_values), token_embedding(tokens [1,T] int64),
text_decoder(embeds [1,T,d] f32, input_pos [1] int64) -> logits [1,T,V], and runtime() -> dict.

The inputs (export/verify.py: `device_inputs`) are the reference's own: pixel_values, text_tokens, and the
teacher-forced decoder calls embeds_<i> at positions[i]. The outputs are each program's result, the last position's
logits of every decoder call, the runtime's description (JSON: its version, the
machine it ran on as the device's own Python sees it) and wall times; the host scores them
(`export.verify.score`) against the reference it kept.
"""
import importlib.util
import json
import platform
import sys
import time

import numpy as np


def load_runner_module(path):
    spec = importlib.util.spec_from_file_location("mote_device_runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv):
    runner_module, artifact_dir, options_json, inputs_path, outputs_path = argv
    with open(options_json) as f:
        options = json.load(f)
    inputs = np.load(inputs_path)
    t0 = time.perf_counter()
    runner = load_runner_module(runner_module).open_runner(artifact_dir, options)
    seconds = {"load": time.perf_counter() - t0}
    out = {}
    t0 = time.perf_counter()
    if "pixel_values" in inputs:
        out["image_embeds"] = np.asarray(runner.vision_encoder(inputs["pixel_values"]), dtype=np.float32)
    out["token_embeds"] = np.asarray(runner.token_embedding(inputs["text_tokens"]), dtype=np.float32)
    seconds["vision_and_embedding"] = time.perf_counter() - t0
    runner.reset()
    logits, decode_seconds = [], 0.0
    positions = inputs["positions"]
    for i in range(len(positions)):
        t0 = time.perf_counter()
        step = runner.text_decoder(inputs[f"embeds_{i}"], positions[i:i + 1])
        logits.append(np.asarray(step, dtype=np.float32)[0, -1])
        if i == 0:
            seconds["prefill"] = time.perf_counter() - t0
        else:
            decode_seconds += time.perf_counter() - t0
    out["logits"] = np.stack(logits)
    seconds["decode_per_token"] = decode_seconds / max(len(positions) - 1, 1)
    described = {**runner.runtime(), "machine": platform.machine(), "python": platform.python_version(),
                 "numpy": np.__version__, "seconds": seconds}
    out["runtime_json"] = np.array(json.dumps(described))
    np.savez(outputs_path, **out)


if __name__ == "__main__":
    main(sys.argv[1:])
