"""Run a saved iOS 18 mlprogram `.mlpackage` on Linux: a numpy walk over its MIL program.

What this is: the package's program read back into coremltools' pymil (`load_program`), then each operation of one
function evaluated in order by coremltools' own `Operation.value_inference()` (the op semantics coremltools uses for
constant folding), with the op's input vars bound, for the duration of the call, to the concrete numpy values computed
so far. The few ops that have no `value_inference` (or one that cannot serve at run time) have a numpy implementation
in `FALLBACKS`. States (`ct.StateType`, iOS 18) are numpy arrays kept by the executor between calls.

What this is not: the Core ML runtime. No compiler passes, no compute unit choice, no ANE/GPU kernels. Numerics
approximate the device: float ops compute in float32 and every op's result is rounded to its output var's dtype (fp16
for an fp16 program), which is what a device does per op up to its accumulation order. Constant subgraphs are the
ones coremltools' loader folded while reading the package (in numpy, at the consts' dtype).

Precision rule, per op: fp16 run-time inputs are upcast to float32 (numpy fp16 arithmetic is slow and not what the
device accumulates in; ops that only move elements, LAYOUT_OPS, take them as they are), the op runs, each output is
cast to its var's dtype (fp16 rounding, int/bool casts).
Weights (consts) are never copied per call: numpy promotes them inside the op, except the fp16 weights of linear and
matmul, which get one float32 copy each on first use (WIDENED_WEIGHT_OPS: the speed of a decode step). A `constexpr_*`
weight (e.g. `constexpr_blockwise_shift_scale`, an int4 / int8 weight with its scales) is decompressed once at load
by coremltools' own `materialized_val_inference`, to the dtype the program declares (fp16 in an fp16 program), and
then read like a const.

Dynamic shapes: a function input with a RangeDim has a symbol for that dim in pymil. While an op runs, every input
var whose declared shape is symbolic is re-typed to the concrete shape of its value, so value_inference code that
reads `self.x.shape` (reshape with -1, shape, slice_by_index, ...) sees the shape of the data, not a symbol.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


def load_program(package: Path):
    """The pymil Program of a saved `.mlpackage` (its spec and weight blobs), as coremltools' milproto loader reads it.

    The loader rebuilds every op through the pymil builder, which folds ops whose inputs are all constant (their
    outputs get a `val`); `MilExecutor` reuses those values as constants."""
    from coremltools.converters.mil.frontend.milproto import load as milproto
    from coremltools.models import utils

    package = Path(package)
    if not package.is_dir():
        raise FileNotFoundError(f"not an .mlpackage directory: {package}")
    spec = utils.load_spec(str(package))
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"{package} is not an mlprogram (model type {spec.WhichOneof('Type')})")
    weights = utils._try_get_weights_dir_path(str(package)) or ""
    return milproto.load(spec, spec.specificationVersion, file_weights_dir=weights)


# ---------------------------------------------------------------------------------------------------------------------
# values


def _np_dtype(builtin) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(builtin))


class _Bound:
    """Stands in for a pymil builtin value while an op runs: Var reads `_sym_val.val` and nothing else."""
    __slots__ = ("val",)

    def __init__(self, val):
        self.val = val


def _upcast(value):
    """fp16 -> float32 for computing; everything else unchanged."""
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    if isinstance(value, np.float16):
        return np.float32(value)
    return value


def _as_var_dtype(value, var) -> np.ndarray:
    """An op's result as its output var's dtype (the per-op rounding), checked against the var's static shape."""
    array = np.asarray(value)
    dtype = _np_dtype(var.dtype)
    if array.dtype != dtype:
        array = array.astype(dtype)
    declared = var.shape
    if len(declared) != array.ndim or any(isinstance(d, int) and d != a for d, a in zip(declared, array.shape)):
        raise RuntimeError(f"MIL op {var.op.op_type} ({var.op.name}) produced shape {array.shape} for {var.name}, "
                           f"declared {declared}: the executor disagrees with the program's types")
    return array


# ---------------------------------------------------------------------------------------------------------------------
# numpy fallbacks: fn(op, args, executor) -> value or tuple of values. `args` maps each input name the op has to its
# value (fp16 run-time values upcast to float32; tuple inputs as lists); state inputs are read from the executor.


def _silu(op, args, ex):
    x = args["x"]
    return x / (1.0 + np.exp(-x))


def _erf(x):
    try:
        from scipy.special import erf
    except ImportError:                       # scipy is pinned in requirements.lock; keep a (slow) exact path anyway
        return np.vectorize(math.erf, otypes=[np.float64])(x)
    return erf(x)


def _gelu(op, args, ex):
    x, mode = args["x"], args.get("mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * np.power(x, 3))))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _erf_op(op, args, ex):
    return _erf(args["x"])


def _band_part(op, args, ex):
    x = args["x"]
    lower, upper = int(args.get("lower", -1)), int(args.get("upper", -1))
    m, n = x.shape[-2:]
    rows, cols = np.arange(m)[:, None], np.arange(n)[None, :]
    keep = np.ones((m, n), dtype=bool)
    if lower >= 0:
        keep &= rows - cols <= lower
    if upper >= 0:
        keep &= cols - rows <= upper
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


def _conv_pads(pad_type: str, custom: list[int], size: list[int], extent: list[int], strides: list[int]):
    """(before, after) padding per spatial dim, as MIL's conv defines pad_type."""
    if pad_type == "valid":
        return [(0, 0)] * len(size)
    if pad_type == "custom":
        return [(int(custom[2 * i]), int(custom[2 * i + 1])) for i in range(len(size))]
    pads = []
    for n, e, s in zip(size, extent, strides):
        total = max((math.ceil(n / s) - 1) * s + e - n, 0)
        small, big = total // 2, total - total // 2
        pads.append((small, big) if pad_type == "same" else (big, small))   # same_lower puts the extra one first
    return pads


def _conv(op, args, ex):
    x, w = args["x"], args["weight"]
    spatial = x.ndim - 2
    strides = [int(s) for s in args.get("strides", [1] * spatial)]
    dilations = [int(d) for d in args.get("dilations", [1] * spatial)]
    groups = int(args.get("groups", 1))
    kernel = list(w.shape[2:])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    pads = _conv_pads(str(args.get("pad_type", "valid")), list(args.get("pad", [0] * 2 * spatial)),
                      list(x.shape[2:]), extent, strides)
    if any(p for pair in pads for p in pair):
        x = np.pad(x, [(0, 0), (0, 0), *pads])
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    if all(s == k and d == 1 for s, k, d in zip(strides, kernel, dilations)):
        # non-overlapping patches (patch embedding): a reshape instead of a window view
        out = [size // k for size, k in zip(x.shape[2:], kernel)]
        x = x[(slice(None), slice(None), *[slice(0, o * k) for o, k in zip(out, kernel)])]
        shape = [n, c_in] + [v for o, k in zip(out, kernel) for v in (o, k)]
        perm = [0, 1] + [2 + 2 * i for i in range(spatial)] + [3 + 2 * i for i in range(spatial)]
        windows = x.reshape(shape).transpose(perm)                         # [n, c, *out, *kernel]
    else:
        windows = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + spatial)))
        windows = windows[(slice(None), slice(None), *[slice(None, None, s) for s in strides],
                           *[slice(None, None, d) for d in dilations])]      # [n, c, *out, *kernel]
        out = list(windows.shape[2:2 + spatial])
    windows = windows.reshape(n, groups, c_in // groups, *out, *kernel)
    weight = w.reshape(groups, c_out // groups, c_in // groups, *kernel)
    letters = "pqrstuvw"[:spatial], "ijkl"[:spatial]
    o, k = letters
    result = np.einsum(f"ngc{o}{k},gdc{k}->ngd{o}", windows, weight, optimize=True).reshape(n, c_out, *out)
    if args.get("bias") is not None:
        result = result + args["bias"].reshape(1, c_out, *[1] * spatial)
    return result


_SCATTER_MODES = {"update": None, "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter_into(data, index, updates, mode: str):
    out = np.array(data, dtype=np.result_type(data, updates))
    if mode == "update":
        out[index] = updates
    elif mode == "sub":                     # MIL: output = data - update (accumulated over repeated indices)
        np.add.at(out, index, -updates)
    else:
        _SCATTER_MODES[mode].at(out, index, updates)
    return out


def _scatter(op, args, ex):
    data, indices, updates = args["data"], np.asarray(args["indices"]), args["updates"]
    axis = int(args.get("axis", 0)) % data.ndim
    indices = np.where(indices < 0, indices + data.shape[axis], indices)
    index = (slice(None),) * axis + (indices,)
    return _scatter_into(data, index, updates, str(args.get("mode", "update")))


def _scatter_nd(op, args, ex):
    data, indices, updates = args["data"], np.asarray(args["indices"]), args["updates"]
    depth = indices.shape[-1]
    index = tuple(np.where(indices[..., i] < 0, indices[..., i] + data.shape[i], indices[..., i])
                  for i in range(depth))
    return _scatter_into(data, index, updates, str(args.get("mode", "update")))


def _gather_nd(op, args, ex):
    x, indices = args["x"], np.asarray(args["indices"])
    batch = int(args.get("batch_dims", 0))
    depth = indices.shape[-1]
    if batch == 0:
        return x[tuple(indices[..., i] for i in range(depth))]
    lead = x.shape[:batch]
    flat_x = x.reshape(-1, *x.shape[batch:])
    flat_i = indices.reshape(-1, *indices.shape[batch:])
    rows = [flat_x[b][tuple(flat_i[b][..., i] for i in range(depth))] for b in range(flat_x.shape[0])]
    return np.stack(rows).reshape(*lead, *rows[0].shape)


def _read_state(op, args, ex):
    # a copy: coreml_update_state writes the state array in place, and this value may be read after that
    return ex.states[op.input.name].copy()


def _update_state(op, args, ex):
    state, value = ex.states[op.state.name], args["value"]
    if value.shape != state.shape:
        raise RuntimeError(f"coreml_update_state ({op.name}): a {value.shape} value for state {op.state.name} "
                           f"{state.shape}")
    np.copyto(state, value, casting="unsafe")     # fp32 compute -> fp16 state: the per-op rounding
    return state.copy()


def _select(op, args, ex):
    return np.where(args["cond"], args["a"], args["b"])


# Ops that only move or select elements: their fp16 inputs are not upcast (the result is the same, and a decoded
# expert [k, rows, K] would be converted to float32 and back at every reshape).
LAYOUT_OPS = {"reshape", "expand_dims", "squeeze", "transpose", "slice_by_size", "slice_by_index", "gather", "concat",
              "tile", "split", "stack"}

# Ops whose fp16 constant operands (weights) are read as float32 copies made once and kept: numpy has no fp16 BLAS,
# so a mixed fp32 x fp16 matmul converts the whole weight on every call (60% of a decode step at the Qwen2.5-0.5B
# shape, 14 s per token). The price is the weights' memory twice more (float32 beside the fp16 consts).
WIDENED_WEIGHT_OPS = {"linear", "matmul"}

FALLBACKS: dict[str, Callable[..., Any]] = {
    "select": _select,                      # value_inference takes a 1-element result for a scalar when the output
                                            # type is symbolic (a [U] index vector: "can only convert an array of
                                            # size 1")
    "silu": _silu,                          # no value_inference in coremltools
    "gelu": _gelu,                          # value_inference's EXACT mode is np.vectorize(math.erf): per element
    "erf": _erf_op,                         # same np.vectorize(math.erf) per-element loop
    "band_part": _band_part,                # value_inference loops over M x N in Python (causal masks are big)
    "conv": _conv,                          # no value_inference
    "scatter": _scatter,                    # no value_inference (index_copy -> scatter: the KV cache write)
    "scatter_nd": _scatter_nd,              # no value_inference (index_put)
    "gather_nd": _gather_nd,                # no value_inference
    "read_state": _read_state,              # states live in the executor, not in the program
    "coreml_update_state": _update_state,   # write_state (+ the read_state the loader merges into it)
}


# ---------------------------------------------------------------------------------------------------------------------
# the executor


@dataclass
class _Step:
    op: Any
    inputs: list                  # unique flattened input vars
    free: list[str]               # run-time values no later op (nor the function's outputs) reads


def _has_value_inference(op) -> bool:
    from coremltools.converters.mil.mil.operation import Operation

    return type(op).value_inference is not Operation.value_inference


def _is_state(var) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def _symbolic(shape) -> bool:
    from coremltools.converters.mil.mil.types.symbolic import any_symbolic

    return any_symbolic(shape)


def _const_value(var):
    """A var's value when the loader knows it (const ops, folded ops), else None."""
    if var.op is not None and var.op.op_type.startswith("constexpr_"):
        return None
    return var.val


class MilExecutor:
    """One function of a saved mlprogram, run with numpy (see the module docstring).

    inputs:  function inputs that are not states: name -> (shape, numpy dtype); a dynamic (RangeDim) dim is None.
    outputs: output names, in the function's order.
    states:  state name -> current value (the state's dtype: fp16 for iOS 18), updated in place by predict().
    """

    def __init__(self, package: Path, function: str = "main"):
        self.package = Path(package)
        self.program = load_program(self.package)
        if function not in self.program.functions:
            raise KeyError(f"{self.package} has no function {function!r} (has {sorted(self.program.functions)})")
        self.function = self.program.functions[function]
        self.inputs: dict[str, tuple[tuple, np.dtype]] = {}
        self.states: dict[str, np.ndarray] = {}
        for name, var in self.function.inputs.items():
            shape = tuple(None if _symbolic((d,)) else int(d) for d in var.shape)
            if _is_state(var):
                self.states[name] = np.zeros(shape, dtype=_np_dtype(var.dtype))
            else:
                self.inputs[name] = (shape, _np_dtype(var.dtype))
        self.outputs: list[str] = [v.name for v in self.function.outputs]
        self._consts: dict[str, Any] = {}
        self._wide: dict[str, np.ndarray] = {}     # float32 copies of fp16 weights (WIDENED_WEIGHT_OPS)
        self._steps: list[_Step] = []
        self._plan()

    # -- setup

    def _plan(self) -> None:
        """Consts once (no copies), then the run-time ops in order, each with the values it frees after it."""
        input_names = set(self.function.inputs)
        for op in self.function.operations:
            if op.blocks:
                raise NotImplementedError(f"MIL op {op.op_type} ({op.name}) has nested blocks (control flow); "
                                          "the executor runs straight-line programs only")
            if op.op_type.startswith("constexpr_"):
                values = op.materialized_val_inference()                          # decompressed once, at load
                values = values if isinstance(values, (tuple, list)) else (values,)
                self._consts.update({v.name: val for v, val in zip(op.outputs, values)})
                continue
            values = [_const_value(v) for v in op.outputs]
            if all(v is not None for v in values):
                self._consts.update({v.name: val for v, val in zip(op.outputs, values)})
                continue
            if op.op_type not in FALLBACKS and not _has_value_inference(op):
                raise NotImplementedError(f"MIL op {op.op_type} ({op.name}) has no value_inference in coremltools "
                                          "and no numpy fallback in mil_executor.FALLBACKS")
            unique = {id(v): v for v in op.get_flattened_inputs()}
            self._steps.append(_Step(op, list(unique.values()), []))
        last_use: dict[str, int] = {}
        for i, step in enumerate(self._steps):
            for var in step.inputs:
                if var.name not in self._consts and var.name not in input_names:
                    last_use[var.name] = i
        for name in self.outputs:
            last_use.pop(name, None)
        for name, i in last_use.items():
            self._steps[i].free.append(name)

    # -- public API

    def op_counts(self) -> dict[str, int]:
        """op type -> number of such ops in the function (consts included)."""
        return dict(Counter(op.op_type for op in self.function.operations))

    def reset(self) -> None:
        """Every state back to zeros (in place)."""
        for state in self.states.values():
            state.fill(0)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the function: output name -> value (as the output var's dtype). States persist."""
        env = self._feed(inputs)
        with np.errstate(over="ignore", under="ignore"):      # exp overflow to inf is the intended saturation
            for step in self._steps:
                self._run(step, env)
                for name in step.free:
                    del env[name]
        result = {}
        for var in self.function.outputs:
            value = env[var.name] if var.name in env else self._consts[var.name]
            result[var.name] = np.array(value) if var.name in self._consts else value
        return result

    # -- internals

    def _feed(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        missing = sorted(set(self.inputs) - set(inputs))
        unknown = sorted(set(inputs) - set(self.inputs))
        if missing or unknown:
            raise ValueError(f"inputs: missing {missing}, unknown {unknown}; expected {sorted(self.inputs)}")
        env = {}
        for name, (shape, dtype) in self.inputs.items():
            value = np.asarray(inputs[name])
            if value.ndim != len(shape) or any(d is not None and d != v for d, v in zip(shape, value.shape)):
                raise ValueError(f"input {name}: shape {value.shape}, expected {shape} (None: any size)")
            env[name] = value.astype(dtype, copy=False)
        return env

    def _value(self, var, env):
        return env[var.name] if var.name in env else self._consts[var.name]

    def _run(self, step: _Step, env: dict) -> None:
        op = step.op
        fallback = FALLBACKS.get(op.op_type)
        results = self._fallback(op, fallback, env) if fallback else self._value_inference(step, env)
        if not isinstance(results, (tuple, list)):
            results = (results,)
        if len(results) != len(op.outputs) or any(r is None for r in results):
            raise NotImplementedError(f"MIL op {op.op_type} ({op.name}): value_inference gave no value for these "
                                      "inputs; it needs a numpy fallback in mil_executor.FALLBACKS")
        for var, value in zip(op.outputs, results):
            env[var.name] = _as_var_dtype(value, var)

    def _fallback(self, op, fn, env):
        args = {}
        for name, var in op.inputs.items():
            if isinstance(var, (list, tuple)):
                args[name] = [_upcast(self._value(v, env)) for v in var]
            elif not _is_state(var):
                args[name] = _upcast(self._value(var, env))
        return fn(op, args, self)

    def _widened(self, var) -> np.ndarray:
        """A float32 copy of an fp16 weight (a const, or a constexpr's decompressed value), made on its first use and
        kept (see WIDENED_WEIGHT_OPS)."""
        if var.name not in self._wide:
            self._wide[var.name] = self._consts[var.name].astype(np.float32)
        return self._wide[var.name]

    def _value_inference(self, step: _Step, env: dict):
        """coremltools' value_inference with each run-time input var bound to its value (and concrete shape)."""
        from coremltools.converters.mil.mil import types

        saved = []
        try:
            for var in step.inputs:
                const = var.name not in env          # a const, a folded op or a constexpr (values in self._consts)
                widened = (const and step.op.op_type in WIDENED_WEIGHT_OPS
                           and getattr(self._consts[var.name], "dtype", None) == np.float16)
                if const and not widened and var.val is not None and not isinstance(var.val, np.bool_):
                    continue                         # a const with its own value bound (a constexpr has none)
                saved.append((var, var._sym_val, var._sym_type))
                value = self._value(var, env)
                if widened:
                    value = self._widened(var)
                elif step.op.op_type not in LAYOUT_OPS:
                    value = _upcast(value)
                if not types.is_tensor(var.sym_type):
                    value = value[()] if isinstance(value, np.ndarray) else value   # scalars as numpy scalars
                    if isinstance(value, np.bool_):
                        value = bool(value)     # numpy 2 refuses np.bool_ where an int is expected (keepdims=)
                elif _symbolic(var.shape):
                    var._sym_type = types.tensor(var.dtype, value.shape)
                var._sym_val = _Bound(value)
            return step.op.value_inference()
        finally:
            for var, sym_val, sym_type in saved:
                var._sym_val, var._sym_type = sym_val, sym_type
