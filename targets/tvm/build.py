"""One post-pass ExportedProgram -> a Relax module whose weights are arguments -> a shared library per architecture.

    import     from_exported_program(ep, custom_convert_map=convert.Converters(target)), no decompositions of its own
    lift       every weight of the program (the importer binds them as constants) becomes an argument of `main`,
               after the program's own inputs, in first-use order: the library holds code, the params file holds the
               weights once for every architecture
    build      tvm.compile(mod, target) with the default Relax pipeline; export_library links with the architecture's
               C compiler (`aarch64-linux-gnu-gcc` for the aarch64 build, `gcc` for the host build the export verifies)

The architectures (`HOST`, `AARCH64`) are fixed LLVM targets, not `-mcpu=native`, so the same input gives the same
bytes on any machine.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from mote.export.errors import InputError


@dataclasses.dataclass(frozen=True)
class Arch:
    """One build of the libraries."""

    name: str              # the library's file suffix: text_decoder.<name>.so
    triple: str            # LLVM target triple
    attrs: tuple           # the rest of the LLVM target (mcpu / mattr)
    compiler: str          # the C compiler that links the shared library
    description: str

    def target(self):
        import tvm

        return tvm.target.Target({"kind": "llvm", "mtriple": self.triple, **dict(self.attrs)})


HOST = Arch("x86_64", "x86_64-linux-gnu", (("mcpu", "x86-64-v3"),), "gcc", "x86-64-v3 (AVX2, FMA), linux")
# --tvm-arch: the phone build. armv8.2-a+dotprod is every Arm core since Cortex-A55/A75 (2017); armv8-a is the
# baseline for older ones (the ternary kernels then use plain NEON multiply-accumulates instead of sdot).
AARCH64 = {
    "armv8.2-a+dotprod": Arch("aarch64", "aarch64-linux-gnu", (("mattr", ["+neon", "+dotprod"]),),
                              "aarch64-linux-gnu-gcc", "aarch64 armv8.2-a+dotprod, linux"),
    "armv8-a": Arch("aarch64", "aarch64-linux-gnu", (("mattr", ["+neon"]),), "aarch64-linux-gnu-gcc",
                    "aarch64 armv8-a, linux"),
}
DEFAULT_AARCH64 = "armv8.2-a+dotprod"


def check_compiler(arch: Arch) -> None:
    """InputError (exit 2, one line) when the compiler that links `arch`'s libraries is missing."""
    if shutil.which(arch.compiler) is not None:
        return
    if arch.triple.endswith("android"):
        raise InputError(f"tvm: TVM_NDK_CC={arch.compiler} is not an executable compiler: point it at an Android NDK "
                         "clang (e.g. .../bin/aarch64-linux-android28-clang) or unset it")
    package = "gcc-aarch64-linux-gnu" if arch.compiler.startswith("aarch64") else "gcc"
    raise InputError(f"tvm: the {arch.name} libraries are linked with {arch.compiler}, which is not on PATH: "
                     f"install the Debian package {package} (./setup.sh does)")


def import_program(ep, target):
    """ExportedProgram -> (Relax IRModule, {tvm data pointer: weight name}).

    The importer binds every weight of the program as a constant; it hands tensors to TVM by DLPack (no copy) or,
    when a tensor is not 64-byte aligned, by a copy. Either way the returned map names the tensor TVM holds, so
    `lift_weights` can tell weights from the importer's own constants.
    """
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from .convert import Converters

    by_pointer = {t.data_ptr(): name for name, t in program_weights(ep).items() if t.numel()}
    names: dict[int, str] = {}

    class Importer(ExportedProgramImporter):
        def _convert_pytorch_tensor_to_tvm(self, tensor):
            value = ExportedProgramImporter._convert_pytorch_tensor_to_tvm(tensor)
            if tensor.numel() and tensor.data_ptr() in by_pointer:
                names[value.data_ptr()] = by_pointer[tensor.data_ptr()]
            return value

    mod = Importer().from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=False,
                                           no_bind_return_tuple=False,
                                           custom_convert_map=Converters(target).convert_map())
    return mod, names


def program_weights(ep) -> dict:
    """name -> tensor for everything the program holds (parameters, buffers, constants)."""
    return {**dict(ep.named_parameters()), **dict(ep.named_buffers()), **ep.constants}


def lift_weights(mod, names: dict[int, str]):
    """Turn every constant of `main` that is one of the program's weights into a trailing argument of `main`.

    Returns (module, [(name, tvm tensor)] in argument order). Constants the importer made itself (scalars) stay.
    """
    from tvm import relax

    lifted: dict[str, tuple] = {}

    @relax.expr_functor.mutator
    class Lift(relax.PyExprMutator):
        def visit_generic_const_(self, const):
            value = const.value
            name = names.get(value.data_ptr()) if value.shape else None
            if name is None:
                return const
            if name not in lifted:
                lifted[name] = (relax.Var(name.replace(".", "_"), const.ty), value)
            return lifted[name][0]

    main = mod["main"]
    body = Lift().visit_expr(main.body)
    params = list(main.params) + [var for var, _ in lifted.values()]
    attrs = dict(main.attrs) if main.attrs else {}
    attrs["num_input"] = len(main.params)
    mod["main"] = relax.Function(params, body, main.ret_ty, main.is_pure, tvm_attrs(attrs))
    return mod, [(name, value) for name, (_, value) in lifted.items()]


def tvm_attrs(attrs: dict):
    import tvm

    return tvm.ir.make_node("ir.DictAttrs", **attrs)


def build_library(mod, arch: Arch, path: Path) -> None:
    """Compile the Relax module for `arch` and link it into the shared library `path`."""
    import tvm
    from tvm.support import cc

    executable = tvm.compile(mod, target=arch.target())
    executable.export_library(str(path), fcompile=cc.cross_compiler(arch.compiler))


def calls(func) -> list:
    """The Relax calls bound in `func`'s body, in order."""
    from tvm import relax

    return [b.value for block in func.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]


def kernel_calls(func) -> list[tuple[str, list]]:
    """(kernel name, argument expressions) of every call_tir / call_tir_inplace of our kernels."""
    out = []
    for call in calls(func):
        if call.op.name in ("relax.call_tir", "relax.call_tir_inplace"):
            out.append((call.args[0].name_hint, list(call.args[1].fields)))
    return out


def is_static(dim) -> bool:
    """Whether a Relax shape dimension is a known integer (not the symbolic sequence length)."""
    return isinstance(dim, int) or hasattr(dim, "value")


def _shape(shape) -> list:
    """A Relax shape as JSON: ints, and "T" for the symbolic sequence length (the programs have one)."""
    return [int(v) if is_static(v) else "T" for v in shape]


def signature(mod, name: str, weights: list[str], params_file: str) -> dict:
    """The manifest entry of a lifted program: inputs, weights in argument order, outputs, the kernels called,
    which weights hold the routed experts (the arguments of the routed-experts kernel) and which hold quantized
    weights (`quantized_weights`, one entry per matrix the quantized kernels read, see `quantized_operands`).
    `weights`: the lifted weights' names, in argument order."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"])
    params = list(main.params)
    lifted = list(zip(params[num_input:], weights))

    def weight_of(arg):   # the weight an argument expression is, if it is one of the lifted parameters
        return next((w for var, w in lifted if var.same_as(arg)), None)

    entry = {
        "inputs": [{"name": p.name, "shape": _shape(p.ty.shape), "dtype": str(p.ty.dtype)}
                   for p in params[:num_input]],
        "weights": weights,
        "params_file": params_file,
        "outputs": [{"shape": _shape(t.shape), "dtype": str(t.dtype)} for t in main.ret_ty.fields],
        "kernels": {},
        "routed_expert_weights": [],
        "quantized_weights": [],
    }
    upper = main.attrs.get("tir_var_upper_bound") if main.attrs else None
    if upper:
        entry["T"] = [int(main.attrs["tir_var_lower_bound"][k]) for k in upper] + [int(v) for v in upper.values()]
    for kernel, args in kernel_calls(main):
        entry["kernels"][kernel] = entry["kernels"].get(kernel, 0) + 1
        if kernel.startswith("mote_routed_experts"):
            routed = [weight_of(a) for a in args[3:]]
            if None in routed:   # every code / scale operand must be a stored weight, or the storage figure is short
                raise RuntimeError(f"tvm: {name}: an operand of {kernel} is not one of the program's weights")
            entry["routed_expert_weights"] += routed
    for call in calls(main):
        kernel = call.args[0].name_hint if call.op.name == "relax.call_tir" else ""
        if kernel.startswith("mote_quantized_"):
            operand = quantized_operands(kernel, call, weight_of)
            if operand not in entry["quantized_weights"]:   # a matrix read by several calls counts once
                entry["quantized_weights"].append(operand)
    entry["relax_ops"] = {}
    for call in calls(main):
        op = call.op.name if hasattr(call.op, "name") else str(call.op)
        entry["relax_ops"][op] = entry["relax_ops"].get(op, 0) + 1
    # the KV cache: the inputs that a call_tir_inplace writes (the cache-row kernel), read from the program
    written = [call.args[1].fields[0] for call in calls(main) if call.op.name == "relax.call_tir_inplace"]
    caches = [p.name for p in params[:num_input] if any(p.same_as(a) for a in written)]
    if caches:
        entry["kv_cache"] = {"inputs": caches, "updated_in_place": True}
    return entry


def quantized_operands(kernel: str, call, weight_of) -> dict:
    """What a quantized kernel's call reads, from the call itself: the stored weights of its values (`q`) and
    scales, the bits (int8 values, or int4 packed in uint8), the matrix's rows and K (the linear's input width x
    [N, K], the embedding's output width y [N, d]) and the group size along K."""
    x, q, scale = call.args[1].fields[:3]
    names = {"q": weight_of(q), "scale": weight_of(scale)}
    if None in names.values():
        raise RuntimeError(f"tvm: an operand of {kernel} is not one of the program's weights")
    bits = {"int8": 8, "uint8": 4}[str(q.ty.dtype)]
    k = int((x.ty if kernel.startswith("mote_quantized_linear") else call.ty).shape[-1])
    return {"kernel": kernel, **names, "bits": bits, "rows": int(q.ty.shape[0]), "k": k,
            "group": k // int(scale.ty.shape[-1])}


def write_params(path: Path, weights: list) -> int:
    """The lifted weights [(name, tvm tensor)] as one safetensors file, tensor by tensor."""
    import torch

    from mote.export.tensor_file import write_safetensors

    tensors = {name: torch.from_dlpack(value) for name, value in weights}
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    return write_safetensors(path, specs, tensors.__getitem__, metadata={"format": "mote-tvm"})
