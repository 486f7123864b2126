"""Our ExecuTorch kernel library (targets/executorch/kernels) inside ExecuTorch's runtime: the `mote::*.out` kernels
of a `.pte` against the ops' PyTorch reference kernels, on every instruction set this CPU runs; what a missing or
mismatched library does; the static archive an app links; and the aarch64 build's self-test under qemu-aarch64."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mote.export.trits import pack_trits
from mote.targets.executorch import kernel_library
from mote.targets.executorch import ops as _out_variants  # noqa: F401  (the .out overloads)

KERNELS = Path(kernel_library.__file__).resolve().parent / "kernels"


def _experts(e, rows, k, per_row, gen):
    trits = torch.randint(-1, 2, (e, rows, k), generator=gen)
    scale = torch.rand(e, rows if per_row else 1, generator=gen) + 0.05
    return pack_trits(trits), scale


def _routed_case(n, d, width, e, top_k, per_row, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen) * 3
    x[0, : d // 2] = 0.5 * torch.arange(d // 2)       # exact .5 ties once scaled
    if n > 2:
        x[2] = 0                                         # the 1e-5 clamp of max|x|
    probs = torch.softmax(torch.randn(n, e, generator=gen), -1)
    top_p, top_i = torch.topk(probs, top_k, dim=-1)
    weights = [*_experts(e, width, d, per_row, gen), *_experts(e, width, d, per_row, gen),
               *_experts(e, d, width, per_row, gen)]
    return x, top_p, top_i, weights


class _Routed(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        for name, w in zip(("gp", "gs", "up", "us", "dp", "ds"), weights):
            self.register_buffer(name, w)

    def forward(self, x, top_p, top_i):
        return torch.ops.mote.routed_experts(x, top_p, top_i, self.gp, self.gs, self.up, self.us, self.dp, self.ds)


class _Linear(torch.nn.Module):
    def __init__(self, packed, scale, k):
        super().__init__()
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.k = k

    def forward(self, x):
        return torch.ops.mote.ternary_linear(x, self.packed, self.scale, self.k)


def _to_pte(module, inputs, dynamic_shapes=None) -> bytes:
    from executorch.exir import EdgeCompileConfig, to_edge

    ep = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes)
    edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    ops = {str(n.target) for n in edge.exported_program().graph.nodes if n.op == "call_function"}
    assert any("mote" in o for o in ops), ops     # the op reaches the .pte as our kernel, not decomposed
    return edge.to_executorch().buffer


def _run(pte: bytes, inputs):
    from executorch.runtime import Runtime

    kernel_library.load()
    method = Runtime.get().load_program(pte).load_method("forward")
    return method.execute(list(inputs))[0]


@pytest.fixture(scope="module")
def isas():
    names = kernel_library.supported_isas()
    yield names
    kernel_library.use_isa(names[-1])


@pytest.mark.parametrize("n,d,width,e,top_k,per_row", [
    (1, 128, 256, 4, 1, False),      # decode at whole vectors of codes
    (9, 70, 45, 3, 2, True),         # prefill, odd widths (tails of a code vector), top-2, per-row scales
    (17, 33, 129, 5, 2, False),
])
def test_routed_experts_kernel_matches_the_reference_on_every_isa(isas, n, d, width, e, top_k, per_row):
    """Every instruction set gives the same bits inside ExecuTorch, and those match the op's PyTorch reference up to
    silu's exp: the kernels call libm's expf, torch its own vectorised exp, and the two differ in the last bit for
    about 1% of inputs (an ulp in h can move its int8 scale). Without silu (ternary_linear) they are bit-exact."""
    x, top_p, top_i, weights = _routed_case(max(n, 4), d, width, e, top_k, per_row, seed=n + d)
    expected = torch.ops.mote.routed_experts(x, top_p, top_i, *weights)
    batch = torch.export.Dim("n", min=1, max=32)   # dynamic tokens: the output is resized to the call's
    pte = _to_pte(_Routed(weights), (x, top_p, top_i), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    first = {}
    for isa in isas:
        kernel_library.use_isa(isa)
        for tokens in sorted({n, 1}):
            got = _run(pte, (x[:tokens], top_p[:tokens], top_i[:tokens]))
            want = expected[:tokens]
            assert (got - want).abs().max() <= 1e-3 * want.abs().max(), (isa, tokens, (got - want).abs().max())
            assert torch.equal(got, first.setdefault(tokens, got)), (isa, tokens)


def test_unchosen_experts_are_not_read(isas):
    """Experts no token chose, their codes and scales poisoned (NaN scales, all-minus-one codes), change nothing."""
    x, top_p, top_i, weights = _routed_case(6, 64, 96, 6, 1, True, seed=3)
    top_i = torch.tensor([[1], [4], [1], [4], [4], [1]])
    expected = torch.ops.mote.routed_experts(x, top_p, top_i, *weights)
    poisoned = [w.clone() for w in weights]
    for unchosen in (0, 2, 3, 5):
        for codes, scale in zip(poisoned[0::2], poisoned[1::2]):
            codes[unchosen] = 0x55
            scale[unchosen] = float("nan")
    clean, pte = _to_pte(_Routed(weights), (x, top_p, top_i)), _to_pte(_Routed(poisoned), (x, top_p, top_i))
    for isa in isas:
        kernel_library.use_isa(isa)
        got = _run(pte, (x, top_p, top_i))
        assert torch.equal(got, _run(clean, (x, top_p, top_i))), isa
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max(), isa


def test_ternary_linear_kernel_is_bit_exact_on_every_isa(isas):
    gen = torch.Generator().manual_seed(7)
    for rows, k, per_row in ((48, 200, True), (16, 3, False), (256, 1024, False)):
        packed = pack_trits(torch.randint(-1, 2, (rows, k), generator=gen))
        scale = torch.rand(rows if per_row else 1, generator=gen) + 0.1
        x = torch.randn(2, 5, k, generator=gen)
        expected = torch.ops.mote.ternary_linear(x, packed, scale, k)
        pte = _to_pte(_Linear(packed, scale, k), (x,))
        for isa in isas:
            kernel_library.use_isa(isa)
            assert torch.equal(_run(pte, (x,)), expected), (isa, rows, k)


def test_an_expert_id_out_of_range_fails_the_call_not_the_process():
    x, top_p, top_i, weights = _routed_case(2, 64, 64, 2, 1, False, seed=1)
    pte = _to_pte(_Routed(weights), (x, top_p, top_i))
    with pytest.raises(RuntimeError):
        _run(pte, (x, top_p, torch.tensor([[0], [2]])))


def test_version_mismatch_is_one_clear_line():
    from mote.export.errors import InputError

    with pytest.raises(InputError, match="needs mote kernel library version 99"):
        kernel_library.require_version(99, Path("model.pte"))


def test_missing_library_is_one_line_exit_2(example, tmp_path):
    """mote-export (before reading the model) and mote-run on a .pte that needs the library: exit 2, one line."""
    out, _ = example.export("android")
    env = {**os.environ, "MOTE_EXECUTORCH_KERNELS": str(tmp_path / "nowhere.so")}
    for argv in (["-m", "mote.tools.cli", "--target", "android", str(example.model_dir), "-o", str(tmp_path / "o")],
                 ["-m", "mote.tools.run", str(out), "--image", str(example.model_dir / "sample.png")]):
        done = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "nowhere.so" in lines[0] and "kernel library is not built" in lines[0], lines
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="this machine has no qemu-aarch64 (Debian qemu-user) or aarch64-linux-gnu-g++: "
                           "setup.sh installs both")
def test_aarch64_selftest_under_qemu(tmp_path):
    """The kernels cross-compiled for aarch64 linux (armv8-a baseline, the dotprod path chosen at run time): their
    self-test (every path vs a plain reference, odd K included) on an emulated CPU without dotprod (plain NEON)
    and on one with it."""
    build = tmp_path / "build"
    subprocess.run(["cmake", "-S", str(KERNELS), "-B", str(build), "-DMOTE_EXECUTORCH=OFF",
                    f"-DCMAKE_TOOLCHAIN_FILE={KERNELS / 'aarch64-linux-gnu.cmake'}"],
                   check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "-j", "2"], check=True, capture_output=True, text=True)
    for cpu, best in (("cortex-a53", "neon"), ("max", "neon-dotprod")):
        done = subprocess.run(["qemu-aarch64", "-cpu", cpu, "-L", "/usr/aarch64-linux-gnu",
                               str(build / "mote_kernels_selftest")], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (cpu, done.stdout[-2000:], done.stderr[-2000:])
        assert "selftest passed" in done.stdout, done.stdout
        assert f"{best}:" in done.stdout, (cpu, done.stdout)
        if best == "neon":
            assert "neon-dotprod:" not in done.stdout, done.stdout


STATIC_APP = """
cmake_minimum_required(VERSION 3.19)
project(mote_static_app CXX)
set(CMAKE_CXX_STANDARD 17)
# What an ExecuTorch source build defines, here from the pinned wheel's headers and runtime
add_library(executorch_core INTERFACE)
target_include_directories(executorch_core INTERFACE {et}/include {et}/include/executorch/runtime/core/portable_type/c10)
target_compile_definitions(executorch_core INTERFACE C10_USING_CUSTOM_GENERATED_MACROS ET_EVENT_TRACER_ENABLED)
target_link_libraries(executorch_core INTERFACE {et}/lib/libexecutorch.so)
add_library(extension_threadpool INTERFACE)
target_link_libraries(extension_threadpool INTERFACE {et}/lib/libexecutorch_threadpool.so)
set(MOTE_SELFTEST OFF)
add_subdirectory({kernels} mote)
add_executable(whole_archive app.cpp)
target_link_libraries(whole_archive PRIVATE -Wl,--whole-archive mote_executorch_kernels -Wl,--no-whole-archive
                      executorch_core extension_threadpool)
add_executable(plain_link app.cpp)
target_link_libraries(plain_link PRIVATE mote_executorch_kernels executorch_core extension_threadpool)
"""

STATIC_APP_MAIN = """
#include <cstdio>
#include <executorch/runtime/kernel/operator_registry.h>
int main() {
  const char* ops[] = {"mote::routed_experts.out", "mote::ternary_linear.out", "mote_bench::routed_experts_float.out"};
  int found = 0;
  for (const char* op : ops) found += executorch::runtime::registry_has_op_function(op);
  std::printf("%d\\n", found);
  return 0;
}
"""


def test_static_archive_for_an_app_registers_the_kernels_when_linked_whole_archive(tmp_path):
    """The plain-CMake route of the README: the kernels' CMake project added to an app's build that has ExecuTorch's
    targets (here stand-ins for a source build's, made from the wheel) gives one static archive; linked
    whole-archive, all three kernels are in the runtime's registry, linked plainly none (why the README says so)."""
    et = list(__import__("executorch").__path__)[0]
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "CMakeLists.txt").write_text(STATIC_APP.format(et=et, kernels=KERNELS))
    (tmp_path / "app" / "app.cpp").write_text(STATIC_APP_MAIN)
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", str(tmp_path / "app"), "-B", str(build)], ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (build / "mote" / "libmote_executorch_kernels.a").is_file()
    found = {app: subprocess.run([str(build / app)], capture_output=True, text=True, check=True).stdout.strip()
             for app in ("whole_archive", "plain_link")}
    assert found == {"whole_archive": "3", "plain_link": "0"}, found
