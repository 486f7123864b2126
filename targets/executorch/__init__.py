"""`--target android`: one ExecuTorch `.pte` with LLaVA-style methods, routed experts kept as 2-bit codes.

Methods: `vision_encoder`, `token_embedding`, `text_decoder` (KV cache in mutable buffers, dynamic T), plus the
constant methods ExecuTorch's LLM runners read (`get_max_seq_len`, `get_max_context_len`, `use_kv_cache`,
`enable_dynamic_shape`, `get_bos_id`, `get_eos_ids`, `get_vocab_size`, `get_n_layers`, `use_sdpa_with_kv_cache`).

Lowering: the `mote::` ops are decomposed into portable ATen ops that gather only the selected experts' packed
bytes (see decompose.py); everything XNNPACK supports (attention, shared expert, router, projector, vision tower
linears) is delegated to XNNPACK in fp32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance
from mote.passes.match import is_op
from mote.passes.program import constant_value
from mote.targets import Lowered, Target, quiet_toolchain

from .decompose import DECOMPOSITIONS, use_float_experts

PTE_NAME = "model.pte"


def routed_expert_storage(ep) -> tuple[int, int]:
    """(routed-expert weights, bytes of their packed codes + scales) as held by the program's constants."""
    weights = nbytes = 0
    for node in ep.graph.nodes:
        if is_op(node, torch.ops.mote.moe_ffn.default):
            x, gp = node.args[0], node.args[6]
            consts = [constant_value(ep, a) for a in node.args[6:12]]
            d, (e, inter) = x.meta["val"].shape[-1], constant_value(ep, gp).shape[:2]
            weights += 3 * e * inter * d
            nbytes += sum(t.numel() * t.element_size() for t in consts)
        elif is_op(node, torch.ops.mote.ternary_linear.default):
            packed, scale = constant_value(ep, node.args[1]), constant_value(ep, node.args[2])
            weights += packed.shape[0] * node.args[3]
            nbytes += packed.numel() + scale.numel() * scale.element_size()
    return weights, nbytes


def constant_methods(model, max_seq_len: int) -> dict:
    cfg = model.config
    return {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
        "get_bos_id": cfg.bos_token_id,
        "get_eos_ids": [cfg.eos_token_id],
        "get_vocab_size": cfg.vocab_size,
        "get_n_layers": cfg.num_hidden_layers,
    }


def to_pte(programs: dict, model, max_seq_len: int, float_experts: bool = False):
    """ExportedPrograms (after the pass pipeline) -> ExecuTorch program manager.

    `float_experts` builds the benchmark's fp32 baseline: the same gather structure over float32 expert weights.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if float_experts:
        for ep in programs.values():
            use_float_experts(ep)
    with quiet_toolchain():
        decomposed = {name: ep.run_decompositions(DECOMPOSITIONS) for name, ep in programs.items()}
        edge = to_edge_transform_and_lower(
            decomposed, partitioner=[XnnpackPartitioner()],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=constant_methods(model, max_seq_len))
        return edge, edge.to_executorch(ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))


def delegation_summary(edge) -> dict:
    """Per method: how many XNNPACK delegate calls and which ops stay on ExecuTorch's portable kernels."""
    out = {}
    for name in edge.methods:
        gm = edge.exported_program(name).graph_module
        delegates, portable = 0, {}
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            target = str(getattr(node.target, "__name__", node.target))
            if "call_delegate" in target:
                delegates += 1
            elif not target.startswith(("getitem", "sym_size", "_assert")):
                key = target.split(".")[0] if target.startswith("aten") else target
                portable[key] = portable.get(key, 0) + 1
        out[name] = {"xnnpack_delegates": delegates, "portable_ops": dict(sorted(portable.items()))}
    return out


class ExecuTorchTarget(Target):
    name = "android"
    kv_style = KVCacheStyle.STATE
    tolerance = Tolerance(min_sqnr_db=60.0)   # exact reference semantics in fp32

    def lower(self, programs, model, out_dir: Path, options: dict) -> Lowered:
        weights, nbytes = routed_expert_storage(programs["text_decoder"])
        float_experts = options.get("experts") == "fp32"
        if float_experts:
            nbytes = weights * 4
        edge, et = to_pte(programs, model, options["max_seq_len"], float_experts)
        path = out_dir / PTE_NAME
        path.write_bytes(et.buffer)
        summary = delegation_summary(edge)
        notes = [
            "routed experts: 2-bit codes (4 per byte) + fp32 scales, decoded in the program; only the top-k experts' "
            "bytes are gathered per token (index_select), exact per-token int8 activation quantization",
            "XNNPACK (fp32, no 8-bit dynamic activations): attention, shared expert, router, projector, vision tower; "
            "portable kernels: the routed-expert gather/decode, top-k routing, KV-cache updates",
            f"KV cache: mutable buffers k_cache_i/v_cache_i, static length {options['max_seq_len']}; "
            "prefill decodes the chosen experts per token (memory grows with T * k * expert size)",
            f"delegation: {summary}",
        ]
        return Lowered(artifacts=[path], routed_expert_weights=weights, routed_expert_bytes=nbytes,
                       deviations=[], notes=notes)

    def runner(self, out_dir: Path, model, max_seq_len: int, options: dict):
        return PteRunner(Path(out_dir) / PTE_NAME, max_seq_len)


class PteRunner:
    """The `.pte`'s methods in ExecuTorch's runtime; the KV cache is the method's own mutable buffers."""

    def __init__(self, path: Path, max_seq_len: int):
        from executorch.runtime import Runtime

        self.program = Runtime.get().load_program(str(path))
        self.max_seq_len = max_seq_len
        self.methods = {}
        self.reset()

    def _method(self, name):
        if name not in self.methods:
            self.methods[name] = self.program.load_method(name)
        return self.methods[name]

    def reset(self):
        # A freshly loaded method starts with a zeroed KV cache.
        self.methods.pop("text_decoder", None)

    def vision_encoder(self, pixel_values):
        return self._method("vision_encoder").execute([pixel_values])[0]

    def token_embedding(self, tokens):
        return self._method("token_embedding").execute([tokens])[0]

    def text_decoder(self, embeds, input_pos):
        return self._method("text_decoder").execute([embeds.contiguous(), input_pos])[0]

    def constant(self, name):
        return self._method(name).execute([])[0]


TARGET = ExecuTorchTarget()
