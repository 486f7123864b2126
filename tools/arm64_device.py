"""The emulated arm64 device: an arm64 Debian root filesystem run by `qemu-aarch64`, with the aarch64 builds of the
pinned runtimes (DESIGN.md sections 5 and 11). Real aarch64 machine code, not a mock; no phone needed.

    python -m mote.tools.arm64_device            build it (setup.sh does), or check it is up to date: fast when it is
    python -m mote.tools.arm64_device --print    where it is and what it holds (JSON)

Built once under build/arm64-device/ (ignored by git), step by step, each step kept when its inputs did not change:

    packages     qemu-user and debootstrap from Debian, only when missing
    rootfs       debootstrap --foreign --variant=minbase bookworm (python3.11, libstdc++, libgomp), its packages
                 unpacked with dpkg-deb (no chroot, no root needed inside), and an arm64 /proc/cpuinfo: qemu -L looks
                 up paths in the root filesystem first, and onnxruntime's cpuinfo reader crashes on the host's x86 one
    wheels       the aarch64 wheels of the runtimes at the exact pins of requirements.lock, with
                 pip --platform manylinux_2_28_aarch64 --only-binary into rootfs/opt/mote/site-packages
    et-kernels   our ExecuTorch kernel library and `.pte` runner (targets/executorch/kernels), cross-compiled with
                 aarch64-linux-gnu-g++ against the aarch64 executorch wheel (cmake rebuilds what changed)

What a device can run is the `Device` contract of tools/devices.py; `EmulatedArm64` is its qemu backend.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT = Path(os.environ.get("MOTE_ARM64_DEVICE", REPO / "build" / "arm64-device"))
SUITE = "bookworm"          # Debian 12: python3.11, the CPython of the cp311 wheels
PYTHON = "/usr/bin/python3.11"
SITE_PACKAGES = "/opt/mote/site-packages"   # inside the root filesystem
PLATFORM = "manylinux_2_28_aarch64"
# The runtimes and what they import; versions come from requirements.lock (the host's exact pins).
WHEELS = ("numpy", "ml_dtypes", "typing_extensions", "onnxruntime", "apache-tvm", "apache-tvm-ffi", "executorch")
DEBIAN_PACKAGES = {"qemu-aarch64": "qemu-user", "debootstrap": "debootstrap",
                   "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
# An arm64 /proc/cpuinfo (a Cortex-A76-like core: what qemu's `-cpu max` offers and more than any runtime asks for).
CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

"""


class DeviceUnavailable(RuntimeError):
    """The emulated device cannot be built here; the message says what is missing."""


def _log(message: str) -> None:
    print(f"arm64-device: {message}", flush=True)


def _run(argv: list[str], what: str, **kwargs) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise DeviceUnavailable(f"{what} failed ({' '.join(argv[:3])} ...): {' | '.join(tail)}")


def _which(program: str) -> str | None:
    # debootstrap lives in /usr/sbin, which a non-login PATH may lack
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def install_packages() -> None:
    """qemu-user, debootstrap and the cross compiler from Debian, only those missing."""
    missing = sorted({pkg for program, pkg in DEBIAN_PACKAGES.items() if _which(program) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise DeviceUnavailable(f"missing {', '.join(missing)} and this machine has no apt-get to install them")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    _log(f"installing Debian packages: {' '.join(missing)}")
    _run([*sudo, "apt-get", "update", "-qq"], "apt-get update")
    _run([*sudo, "apt-get", "install", "-y", "-qq", *missing], f"apt-get install {' '.join(missing)}",
         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def debian_mirror() -> str:
    """The machine's own Debian mirror (its apt sources), else deb.debian.org; MOTE_DEBIAN_MIRROR overrides."""
    if os.environ.get("MOTE_DEBIAN_MIRROR"):
        return os.environ["MOTE_DEBIAN_MIRROR"]
    sources = list(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2 and "security" not in line:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def build_rootfs(root: Path) -> Path:
    """The arm64 root filesystem (kept once complete: its marker file is written last)."""
    rootfs = root / "rootfs"
    marker = rootfs / ".mote-rootfs-complete"
    if marker.is_file():
        return rootfs
    partial = root / "rootfs.partial"
    if partial.exists():
        shutil.rmtree(partial)   # ours: a build interrupted before its marker
    root.mkdir(parents=True, exist_ok=True)
    _log(f"building the arm64 Debian {SUITE} root filesystem (debootstrap, about a minute)")
    _run([_which("debootstrap") or "debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
          "--include=python3,libgomp1,libstdc++6", SUITE, str(partial), debian_mirror()], "debootstrap")
    # --foreign downloads every package but unpacks only some; unpack them all (no maintainer scripts are needed
    # to run Python and shared libraries)
    for deb in sorted((partial / "var/cache/apt/archives").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(partial)], f"unpacking {deb.name}")
        deb.unlink()
    if not (partial / PYTHON.lstrip("/")).exists():
        raise DeviceUnavailable(f"the root filesystem has no {PYTHON} after debootstrap")
    (partial / "proc").mkdir(exist_ok=True)
    (partial / "proc" / "cpuinfo").write_text(CPUINFO)
    (partial / ".mote-rootfs-complete").write_text(SUITE + "\n")
    if rootfs.exists():
        shutil.rmtree(rootfs)
    partial.rename(rootfs)
    return rootfs


def pinned_wheels() -> list[str]:
    """`name==version` of WHEELS at the exact pins of requirements.lock."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, _, ver = line.split("#")[0].strip().partition("==")
        if ver:
            pins[name.lower().replace("_", "-")] = ver
    missing = [w for w in WHEELS if w.lower().replace("_", "-") not in pins]
    if missing:
        raise DeviceUnavailable(f"requirements.lock pins no version of {', '.join(missing)}")
    return [f"{w}=={pins[w.lower().replace('_', '-')]}" for w in WHEELS]


def install_wheels(rootfs: Path) -> Path:
    """The aarch64 wheels of the runtimes, reinstalled only when the pins change."""
    site = rootfs / SITE_PACKAGES.lstrip("/")
    wanted = "\n".join(pinned_wheels()) + "\n"
    stamp = site / ".mote-wheels"
    if stamp.is_file() and stamp.read_text() == wanted:
        return site
    if site.exists():
        shutil.rmtree(site)   # ours (inside our root filesystem): a different set of pins
    _log(f"installing the aarch64 wheels: {' '.join(wanted.split())}")
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", "--platform", PLATFORM,
          "--python-version", "3.11", "--target", str(site), *wanted.split()], "pip install of the aarch64 wheels")
    stamp.write_text(wanted)
    return site


def build_kernels(root: Path, site: Path) -> Path:
    """Our kernel library and `.pte` runner for aarch64, against the aarch64 executorch wheel."""
    build = root / "et-kernels"
    sources = REPO / "targets" / "executorch" / "kernels"
    log = root / "et-kernels.log"
    with log.open("w") as out:
        for argv in (["cmake", "-S", str(sources), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                      f"-DCMAKE_TOOLCHAIN_FILE={sources / 'aarch64-linux-gnu.cmake'}",
                      f"-DMOTE_EXECUTORCH_WHEEL={site / 'executorch'}", "-DMOTE_SELFTEST=OFF"],
                     ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                raise DeviceUnavailable(f"cross-building the ExecuTorch kernels for aarch64 failed: see {log}")
    return build


def layout(root: Path | None = None) -> dict:
    """Where the device's parts are (host paths; qemu -L also resolves them inside the root filesystem)."""
    root = root or ROOT
    rootfs, build = root / "rootfs", root / "et-kernels"
    site = rootfs / SITE_PACKAGES.lstrip("/")
    return {"root": str(root), "rootfs": str(rootfs), "python": str(rootfs / PYTHON.lstrip("/")),
            "site_packages": str(site), "executorch_dir": str(site / "executorch"),
            "et_kernels": str(build / "libmote_executorch_kernels.so"),
            "pte_runner": str(build / "libmote_pte_runner.so"),
            "wheels": (site / ".mote-wheels").read_text().split() if (site / ".mote-wheels").is_file() else []}


def missing_reason(root: Path | None = None) -> str | None:
    """Why the device is not ready to run (None: it is)."""
    root = root or ROOT
    if _which("qemu-aarch64") is None:
        return "qemu-aarch64 is not installed (Debian package qemu-user)"
    parts = layout(root)
    for key in ("python", "et_kernels", "pte_runner"):
        if not Path(parts[key]).is_file():
            return f"{parts[key]} is missing: run python -m mote.tools.arm64_device (setup.sh does)"
    if not parts["wheels"]:
        return f"{parts['site_packages']} holds no runtimes: run python -m mote.tools.arm64_device"
    return None


def ensure(root: Path | None = None) -> dict:
    """Build what is missing or stale; returns the layout. One process at a time (the test workers may ask together):
    the others wait for it, then find everything up to date."""
    import fcntl

    root = root or ROOT
    install_packages()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rootfs = build_rootfs(root)
        site = install_wheels(rootfs)
        build_kernels(root, site)
    return layout(root)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mote.tools.arm64_device", description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the device's layout (JSON) instead of building")
    args = ap.parse_args(argv)
    if args.print:
        print(json.dumps({**layout(), "missing": missing_reason()}, indent=2))
        return 0
    try:
        parts = ensure()
    except DeviceUnavailable as e:
        print(f"arm64-device: cannot build the emulated arm64 device: {e}", file=sys.stderr)
        return 2
    _log(f"ready: {parts['root']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
