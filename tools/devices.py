"""Devices an artifact's smoke test runs on (`mote-export --smoke-test arm64`, runtime_tests/test_arm64_smoke.py).

A device runs Python with numpy and the aarch64 runtimes, and nothing of ours but the files it is given: the
driver `targets/on_device.py`, a target's `device_runner.py`, the artifact, and the inputs as an .npz. The check
itself (tools/smoke.py) is the same on every device; a `Device` only moves files and starts the interpreter.

    EmulatedArm64   qemu-aarch64 on this machine, in the arm64 root filesystem of tools/arm64_device.py; it
                    shares the host's files, so `push` and `pull` are the identity
    (next)          a phone over adb: push to /data/local/tmp, `adb shell` the same command, pull the outputs
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Protocol

from mote.export.errors import InputError
from mote.tools import arm64_device

# An aarch64 CPU with what our kernels and TVM's aarch64 build use (NEON, dotprod), as phones have. Not qemu's `max`
# (its default): with SVE/SME there XNNPACK picks kernels that qemu emulates about 6x slower.
QEMU_CPU = "cortex-a76"


class Device(Protocol):
    name: str        # what `--smoke-test` calls it
    kind: str        # "emulated" or "real"
    arch: str        # the machine's architecture as `uname -m` says it

    def describe(self) -> dict: ...                       # for report.json: what ran the artifact
    def runner_options(self) -> dict: ...                 # the device's own builds (targets/<t>/device_runner.py)
    def push(self, host_path: Path) -> str: ...           # copy a file or folder there: its path on the device
    def output_path(self, host_path: Path) -> str: ...    # where the device writes what `pull` brings to host_path
    def pull(self, device_path: str, host_path: Path) -> Path: ...
    def run_python(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess: ...


class EmulatedArm64:
    name, kind, arch = "arm64", "emulated", "aarch64"

    def __init__(self, root: Path | None = None):
        reason = arm64_device.missing_reason(root)
        if reason is not None:
            raise InputError(f"--smoke-test arm64: the emulated device is not ready: {reason}")
        self.layout = arm64_device.layout(root)

    def describe(self) -> dict:
        qemu = subprocess.run(["qemu-aarch64", "--version"], capture_output=True, text=True).stdout
        found = re.search(r"version ([\w.+~:-]+)", qemu)
        return {"device": self.name, "kind": self.kind, "arch": self.arch,
                "emulator": f"qemu-aarch64 {found.group(1) if found else 'unknown'} -cpu {QEMU_CPU}",
                "os": f"Debian {arm64_device.SUITE} arm64 root filesystem",
                "wheels": self.layout["wheels"]}

    def runner_options(self) -> dict:
        return {"executorch_dir": self.layout["executorch_dir"], "kernels": self.layout["et_kernels"],
                "runner_lib": self.layout["pte_runner"]}

    def push(self, host_path: Path) -> str:
        return str(Path(host_path).resolve())

    def output_path(self, host_path: Path) -> str:
        return str(Path(host_path).resolve())

    def pull(self, device_path: str, host_path: Path) -> Path:
        return Path(device_path)

    def run_python(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": self.layout["site_packages"],
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        # -P: the script's folder (targets/, which holds packages named like the runtimes: tvm/, onnx/) stays off
        # sys.path
        return subprocess.run(["qemu-aarch64", "-cpu", QEMU_CPU, "-L", self.layout["rootfs"], self.layout["python"],
                               "-P", *argv], capture_output=True, text=True, timeout=timeout, env=env)


DEVICES = {"arm64": EmulatedArm64}


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise InputError(f"--smoke-test {name}: no such device (have: {', '.join(sorted(DEVICES))})")
    return DEVICES[name]()
