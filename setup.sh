#!/usr/bin/env bash
# One-time (and idempotent) setup: a project-local .venv with the pinned toolchain.
# torch goes in first and alone, so no other package can drag in a CUDA build of it.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need_apt+=(gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || need_apt+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null 2>&1 || need_apt+=(qemu-user)   # the aarch64 kernels' self-test
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python

# Our ExecuTorch kernel library (targets/executorch/kernels), built against the pinned wheel's runtime; cmake's own
# dependency tracking rebuilds it when its sources change, and does nothing when they did not.
build_kernels() {
  local et build=build/et-kernels
  et=$($VPY -c "import executorch; print(list(executorch.__path__)[0])")
  mkdir -p build
  if ! { cmake -S targets/executorch/kernels -B "$build" -DMOTE_EXECUTORCH_WHEEL="$et" -DMOTE_SELFTEST=ON \
           -DCMAKE_BUILD_TYPE=Release && cmake --build "$build" -j "$(nproc)"; } > build/et-kernels.log 2>&1; then
    cat build/et-kernels.log >&2; echo "setup: building the ExecuTorch kernel library failed" >&2; exit 1
  fi
}

# The emulated arm64 device of the on-device smoke tests (tools/arm64_device.py: qemu-user and debootstrap when
# missing, an arm64 Debian root filesystem, the runtimes' aarch64 wheels, our kernels cross-built for it), cached in
# build/arm64-device/; a second run checks and rebuilds only what changed. Without it everything else still works:
# its tests then say why it is missing.
build_arm64_device() {
  if ! $VPY -m mote.tools.arm64_device > build/arm64-device.log 2>&1; then
    tail -n 3 build/arm64-device.log >&2
    echo "setup: the emulated arm64 device was not built (log: build/arm64-device.log)" >&2
  fi
}

stamp=.venv/.mote-setup-stamp
want=$(cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  build_kernels
  build_arm64_device
  exit 0   # already set up for exactly these pins
fi

pip_q() {  # quiet pip; on failure show its log without the local-index noise
  if ! $VPY -m pip install -q "$@" > .venv/pip.log 2>&1; then
    grep -v "is ignored: it is neither" .venv/pip.log >&2; echo "setup: pip install $* failed" >&2; exit 1
  fi
}
pip_q "torch==2.13.0"
pip_q -r requirements.lock
pip_q --no-deps --no-build-isolation -e .
$VPY -c "import torch, executorch, coremltools, tvm, onnxruntime, onnxscript, tokenizers, PIL, transformers" >/dev/null 2>&1 \
  || { echo "setup: the pinned toolchain did not import" >&2; exit 1; }
echo "$want" > "$stamp"
build_kernels
build_arm64_device
echo "setup: .venv ready"
