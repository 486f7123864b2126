"""The example's artifacts on emulated arm64: the aarch64 builds of onnxruntime, TVM and ExecuTorch (with our kernel
library cross-built for aarch64) run them under qemu-aarch64 in an arm64 Debian root filesystem (tools/arm64_device.py,
built by setup.sh), on the verification inputs, at the same bars as on the host (DESIGN.md section 6).

Skipped only where this machine has no qemu-aarch64 (the Debian package qemu-user): a device that qemu could run but
that fails to build is an error, not a skip."""
import shutil

import pytest

from mote.tools import arm64_device

DEVICE_TARGETS = ["android", "onnx", "tvm"]

pytestmark = pytest.mark.skipif(shutil.which("qemu-aarch64") is None,
                                reason="this machine has no qemu-aarch64 (Debian package qemu-user): no emulated "
                                       "arm64 device")


@pytest.fixture(scope="session")
def arm64():
    from mote.tools.devices import EmulatedArm64

    arm64_device.ensure()          # a no-op when setup.sh built it; a build failure fails the tests
    return EmulatedArm64()


@pytest.fixture(scope="session")
def example_record(example):
    """The reference's record on the example's verification inputs, as mote-export makes it."""
    from mote.export.generate import EagerRunner
    from mote.export.loader import load_model
    from mote.export.verify import record_reference
    from mote.tools import cli

    args = cli.parse_args(["--target", "onnx", str(example.model_dir)])
    model = load_model(example.model_dir)
    prompt, pixel_values, _ = cli.verification_inputs(args, model)
    return record_reference(EagerRunner(model, cli.default_max_seq_len(args, model.config)), prompt, pixel_values)


def _greedy(stats):
    matched, total = stats["greedy_match"].split("/")
    return int(matched), int(total)


@pytest.mark.parametrize("target", DEVICE_TARGETS)
def test_example_artifact_runs_on_emulated_arm64(target, example, example_record, arm64):
    from mote.export.verify import Tolerance
    from mote.targets import get_target
    from mote.tools.smoke import smoke_test

    out, report = example.export(target)
    tolerance = Tolerance(**report["tolerance"])   # the bar the host verified this artifact at
    section = smoke_test(get_target(target), out, example_record, tolerance, arm64, report["numerics"])

    runtime = section["runtime"]
    assert runtime["machine"] == "aarch64"          # the device's own Python: aarch64 code under qemu
    assert section["device"]["kind"] == "emulated" and section["device"]["arch"] == "aarch64"
    assert section["passed"], section.get("failure")
    decoder = section["numerics"]["text_decoder"]
    matched, total = _greedy(decoder)
    assert matched == total == len(example_record.tokens)
    assert decoder["sqnr_db"] >= min(tolerance.min_sqnr_db, decoder.get("reference_noise_floor_db", 1e9))
    assert section["numerics"]["vision_encoder"]["sqnr_db"] >= tolerance.min_sqnr_db
    # the host and the device decode the same tokens; only the decoder's comparison speaks of tokens
    assert set(section["vs_host"]) == set(report["numerics"])
    assert section["vs_host"]["text_decoder"]["same_greedy"]
    assert all("same_greedy" not in both for program, both in section["vs_host"].items() if program != "text_decoder")
    if target == "onnx":
        assert runtime["files"] == ["text_decoder.ort", "token_embedding.ort", "vision_encoder.ort"]
    elif target == "tvm":
        assert runtime["library_arch"] == "aarch64"
    else:
        # our kernel library's NEON kernels ran inside ExecuTorch
        assert runtime["kernels_isa"] == "neon-dotprod"   # cortex-a76: NEON with dotprod


@pytest.mark.parametrize("target", ["onnx"])   # the cheapest export; grouped with the onnx tests (xdist)
def test_smoke_test_cli_writes_on_device_section(target, example, export_cli, tmp_path):
    """mote-export --smoke-test arm64: report.json's on_device section (schema-checked by export_cli)."""
    report = export_cli(target, example.model_dir, tmp_path / "out", "--smoke-test", "arm64")
    section = report["on_device"]
    assert section["passed"] and section["runtime"]["machine"] == "aarch64"
    assert section["runtime"]["runtime"] == "onnxruntime"
    assert section["device"]["emulator"].startswith("qemu-aarch64")
    assert "smoke_test" in report["timings_s"]
    assert section["numerics"]["text_decoder"]["greedy_match"] == report["numerics"]["text_decoder"]["greedy_match"]


@pytest.mark.parametrize("target", ["onnx"])
def test_artifact_that_fails_on_the_device_is_one_line(target, example, example_record, arm64, tmp_path):
    """A broken artifact: the runtime's own error comes back as one line naming the device."""
    from mote.export.verify import Tolerance
    from mote.targets import get_target
    from mote.tools.smoke import SmokeTestError, smoke_test

    out, report = example.export(target)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    path = broken / "text_decoder.ort"
    path.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(SmokeTestError, match=r"failed on the arm64 device \(exit 1\): .+") as caught:
        smoke_test(get_target(target), broken, example_record, Tolerance(**report["tolerance"]), arm64)
    assert "\n" not in str(caught.value)
