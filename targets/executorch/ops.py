"""The out-variant overloads of the ops our kernel library runs (kernels/src/mote_executorch.cpp).

ExecuTorch's `to_executorch` turns each functional op into its `.out` overload, whose output the memory plan
provides; an op without one cannot be emitted. These schemas are the library's ABI: the kernels unbox their
arguments in this order (kernel_library.KERNELS_VERSION changes with them).
"""
from __future__ import annotations

import torch

from mote.passes import ops as _mote_ops  # noqa: F401  (defines mote::ternary_linear)
from mote.targets import lowering as _lowering  # noqa: F401  (defines mote::routed_experts, mote_bench::...)

from . import quantized as _quantized  # noqa: F401  (defines mote::packed_quantized_linear)

OUT_SCHEMAS = {
    ("mote", "routed_experts"): "routed_experts.out(Tensor x, Tensor top_p, Tensor top_i, Tensor gate_packed, "
                                "Tensor gate_scale, Tensor up_packed, Tensor up_scale, Tensor down_packed, "
                                "Tensor down_scale, *, Tensor(a!) out) -> Tensor(a!)",
    ("mote", "ternary_linear"): "ternary_linear.out(Tensor x, Tensor packed, Tensor scale, SymInt in_features, *, "
                                "Tensor(a!) out) -> Tensor(a!)",
    ("mote", "packed_quantized_linear"): "packed_quantized_linear.out(Tensor x, Tensor packed, Tensor scale, "
                                         "Tensor? bias, SymInt bits, SymInt group_size, *, Tensor(a!) out) -> Tensor(a!)",
    ("mote_bench", "routed_experts_float"): "routed_experts_float.out(Tensor x, Tensor top_p, Tensor top_i, "
                                            "Tensor gate_w, Tensor up_w, Tensor down_w, *, Tensor(a!) out) "
                                            "-> Tensor(a!)",
}


def _out_kernel(functional):
    def kernel(*args, out):
        result = functional(*args)
        out.resize_(result.shape)
        return out.copy_(result)

    return kernel


def _register() -> list[torch.library.Library]:
    libraries = []
    for (namespace, name), schema in OUT_SCHEMAS.items():
        if hasattr(getattr(getattr(torch.ops, namespace), name), "out"):
            continue   # registered by an earlier import of this module under another name
        lib = torch.library.Library(namespace, "FRAGMENT")
        lib.define(schema)
        functional = getattr(getattr(torch.ops, namespace), name).default
        lib.impl(f"{name}.out", _out_kernel(functional), "CompositeExplicitAutograd")
        libraries.append(lib)
    return libraries


_LIBRARIES = _register()   # kept alive: a Library's registrations last as long as the object
KERNEL_OPS = tuple(getattr(getattr(torch.ops, ns), name).default for ns, name in OUT_SCHEMAS)
