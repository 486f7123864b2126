"""Benchmark of the ONNX target in onnxruntime: 2-bit ternary experts (QMoE) vs float32 experts (MoE), same model.

    python -m mote.tools.bench_onnx [--quick] [--json out.json] [--threads 1]

For each configuration (random text-only MoTE models, top-1) and for E and 4E routed experts (default: 4 and 16),
the same model is lowered twice with the real `onnx` target: the deployable export (routed experts as
`com.microsoft.QMoE`, 2-bit codes, block-wise fp32 scales) and the benchmark baseline `experts="fp32"` (the same
dequantized expert weights in float32 `com.microsoft.MoE`). It reports

- the size of `text_decoder.onnx` and the routed-expert bits per weight of both (counted in the artifact; for the
  ternary export also checked against what the target reports, `Lowered.routed_expert_bits_per_weight`);
- prefill latency (T tokens from input_pos 0, empty cache) and decode-step latency (one token, after a prefill,
  the KV cache fed back step by step) of the whole `text_decoder` in onnxruntime, median of repeats;
- the expert-count scaling: decode latency with 4E experts over E (top-1 reads one expert per token either way).

Configurations: a tiny width (d=128, block 128 -> 2.25 bits/weight) and a realistic width (DESIGN.md section 9:
d=1024, expert width 1536, block 512 -> 2.0625 bits/weight), 2 layers each. `--quick` uses 1-layer d=128 / d=512
models. Only `text_decoder` is lowered, and its `.ort` copy is not written (it is not what is timed).

Sessions run on the CPU execution provider with an explicit thread count (1 intra-op and 1 inter-op thread by
default, sequential execution) so that numbers are stable; all sessions of a configuration are timed interleaved
(round-robin), so background load hits them alike. Timings are reported, never checked.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from mote.tools.bench_common import (SCALING_COLUMNS, VARIANTS, Column, Mode, ModelShape, RunClock,
                                     add_timings_and_ratios, describe_run, expert_scaling_rows, format_result,
                                     run_cli, time_interleaved, variant_comparison_columns)

FP32_ROUTING_NOTE = ("the fp32 baseline (com.microsoft.MoE, no router_weights input) weighs the top-1 expert by 1.0 "
                     "instead of its router probability; that changes its output, not its cost")


MODES = {
    # ~3 min on 2 cores (4.3 GB peak RSS), mostly exporting the realistic-width models (the 4E fp32 one: 0.7 GB)
    "default": Mode(shapes=(
        ModelShape("tiny (d=128)", hidden=128, expert_intermediate=256, intermediate=256),
        ModelShape("realistic (d=1024)", hidden=1024, expert_intermediate=1536, intermediate=2816, heads=8, vocab=1024),
    ), max_seq_len=128, prefill_len=64, decode_prefix=64, decode_steps=50, min_seconds=1.0),
    "quick": Mode(shapes=(
        ModelShape("tiny (d=128)", hidden=128, expert_intermediate=256, intermediate=256, layers=1, experts=(4,)),
        ModelShape("wide (d=512)", hidden=512, expert_intermediate=512, intermediate=1024, layers=1, vocab=512),
    ), max_seq_len=128, prefill_len=64, decode_prefix=64, prefill_repeats=5, decode_steps=30, min_seconds=0.3),
    # the smoke test: seconds, numbers meaningless
    "smoke": Mode(shapes=(
        ModelShape("smoke (d=64)", hidden=64, expert_intermediate=64, intermediate=128, layers=1, vocab=256,
                   experts=(2, 8)),
    ), max_seq_len=32, prefill_len=8, decode_prefix=8, prefill_warmup=1, prefill_repeats=2, decode_warmup=1,
        decode_steps=3, min_seconds=0.0),
}
# the artifact whose size is compared between variants and expert counts (JSON: onnx_bytes, onnx_bytes_ratio)
SIZE_KEY = "onnx_bytes"


def routed_expert_storage(onnx_path: Path) -> dict:
    """Bytes of the initializers feeding the routed-expert ops (QMoE / MoE weights and scales) in the artifact."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    inits = {t.name: t for t in m.graph.initializer}
    ops, blocks, total = set(), set(), 0
    for node in m.graph.node:
        if node.domain == "com.microsoft" and node.op_type in ("QMoE", "MoE"):
            ops.add(node.op_type)
            blocks |= {a.i for a in node.attribute if a.name == "block_size"}
            # inputs 0/1 are the activations and router logits; the rest that are initializers are expert storage
            total += sum(numpy_helper.to_array(inits[n]).nbytes for n in node.input[2:] if n in inits)
    return {"ops": sorted(ops), "blocks": sorted(blocks), "bytes": total}


def lower_variant(model, variant: str, max_seq_len: int, out_dir: Path):
    """torch.export + the pass pipeline + the onnx target's lower(); only the text decoder is lowered.

    The `.ort` copies lower() also writes are not timed here (their graph is the `.onnx` one, pre-optimised), so
    their conversion (a subprocess, seconds per model) is skipped.
    """
    import mote.targets.onnx as onnx_target
    from mote.targets import CommonOptions
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline

    # lower() rewrites the programs in place, so each variant exports its own (deterministic) copy
    programs = export_programs(model, max_seq_len, KVCacheStyle.IO)
    programs, _ = run_pipeline({"text_decoder": programs["text_decoder"]}, model.config.moe.moe_layers, verify=False)
    target = onnx_target.TARGET
    return target.lower(programs, model, CommonOptions(None, out_dir, max_seq_len, fp32_experts=variant == "fp32"),
                        target.Options(ort=False))


class TimedDecoder:
    """One text_decoder session, driven directly: embeds + input_pos + past_* in, logits + present_* out."""

    def __init__(self, path: Path, threads: int, hidden: int, seed: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.rng = np.random.default_rng(seed)
        self.hidden = hidden
        self.empty = {i.name: np.zeros(i.shape, dtype=np.float32) for i in self.past}
        self.cache = dict(self.empty)
        self.pos = 0

    def _embeds(self, t: int) -> np.ndarray:
        return self.rng.standard_normal((1, t, self.hidden), dtype=np.float32)

    def _run(self, embeds: np.ndarray, pos: int, cache: dict) -> tuple[float, dict]:
        feeds = {"embeds": embeds, "input_pos": np.array([pos], dtype=np.int64), **cache}
        t0 = time.perf_counter()
        outs = self.session.run(None, feeds)
        dt = time.perf_counter() - t0
        return dt, dict(zip(self.outputs, outs))

    def prefill(self, t: int) -> float:
        """T tokens from position 0 into an empty cache (stateless: the cache is an input)."""
        dt, _ = self._run(self._embeds(t), 0, self.empty)
        return dt

    def start_decode(self, prefix: int) -> None:
        _, outs = self._run(self._embeds(prefix), 0, self.empty)
        self.cache = {p.name: outs[p.name.replace("past_", "present_")] for p in self.past}
        self.pos = prefix

    def decode_step(self) -> float:
        dt, outs = self._run(self._embeds(1), self.pos, self.cache)
        self.cache = {p.name: outs[p.name.replace("past_", "present_")] for p in self.past}
        self.pos += 1
        return dt


def bench_shape(shape: ModelShape, mode: Mode, threads: int, work: Path, log) -> list[dict]:
    """Lower each expert count x variant, then time all sessions together. One row per expert count."""
    from mote.tools.make_random_model import random_model

    rows, decoders = [], {}
    for experts in shape.experts:
        model = random_model(shape.config(experts, mode.max_seq_len), seed=0)
        row = {"config": shape.name, "hidden": shape.hidden, "expert_intermediate": shape.expert_intermediate,
               "shared_intermediate": shape.intermediate, "layers": shape.layers, "vocab": shape.vocab,
               "experts": experts, "top_k": shape.top_k, "parameters": model.config.parameter_count()}
        for variant in VARIANTS:
            out = Path(tempfile.mkdtemp(prefix=f"{variant}-E{experts}-", dir=work))
            t0 = time.perf_counter()
            lowered = lower_variant(model, variant, mode.max_seq_len, out)
            path = out / "text_decoder.onnx"
            storage = routed_expert_storage(path)
            n = lowered.routed_expert_weights
            facts = {"onnx_bytes": path.stat().st_size, "routed_expert_weights": n,
                     "routed_expert_bytes": storage["bytes"], "expert_ops": storage["ops"],
                     "bits_per_weight": storage["bytes"] * 8 / n, "lower_s": time.perf_counter() - t0}
            if variant == "qmoe":
                # what the target reports (report.json's routed_expert_bits_per_weight) must be what the file holds
                facts["bits_per_weight_reported"] = lowered.routed_expert_bits_per_weight
                facts["reported_matches_artifact"] = abs(lowered.routed_expert_bits_per_weight
                                                         - facts["bits_per_weight"]) < 1e-6
                facts["blocks"] = storage["blocks"]
            row[variant] = facts
            log(f"bench_onnx: {shape.name} E={experts} {variant}: lowered in {facts['lower_s']:.1f} s, "
                f"text_decoder.onnx {facts['onnx_bytes'] / 1e6:.2f} MB, {facts['bits_per_weight']:.4f} bits/weight")
            # same seed for both variants: the same input embeddings, so the same routing decisions
            decoders[(experts, variant)] = TimedDecoder(path, threads, shape.hidden, seed=experts)
        del model
        rows.append(row)
    log(f"bench_onnx: {shape.name}: timing {len(decoders)} sessions (prefill T={mode.prefill_len}, "
        f"decode rounds of {mode.decode_steps} steps, >= {mode.min_seconds} s each)")
    add_timings_and_ratios(rows, time_interleaved(decoders, mode), SIZE_KEY)
    return rows


def scaling_rows(rows: list[dict]) -> list[dict]:
    """Per configuration benchmarked at several expert counts: the largest E against the smallest."""
    return expert_scaling_rows(rows, SIZE_KEY)


def run_benchmark(mode: str = "default", threads: int = 1, work_dir: Path | None = None, log=None) -> dict:
    """The whole benchmark; returns a JSON-able dict with `settings`, `rows`, `scaling` and `notes`."""
    import onnxruntime as ort

    log = log or (lambda msg: None)
    m = MODES[mode]
    clock = RunClock()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mote-bench-", dir=work_dir) as work:
        for shape in m.shapes:
            rows += bench_shape(shape, m, threads, Path(work), log)
    settings = {"mode": mode, "threads": {"intra_op": threads, "inter_op": 1, "execution": "sequential"},
                "onnxruntime": ort.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                "max_seq_len": m.max_seq_len, "prefill_len": m.prefill_len, "prefill_repeats_min": m.prefill_repeats,
                "decode_warmup": m.decode_warmup, "decode_steps_per_round": m.decode_steps,
                "min_seconds_per_session": m.min_seconds,
                "decode_positions": [m.decode_prefix, m.last_decode_position], **clock.settings()}
    notes = [
        FP32_ROUTING_NOTE,
        "fp32 experts = the ternary experts dequantized (same model, same routing); both variants run the same "
        "attention, fp32 shared expert, router and lm head, so latencies are of the whole text_decoder",
        "com.microsoft.QMoE's block-wise 2-bit kernel quantizes the expert activations itself (a declared deviation)",
        "bits/weight = routed-expert weight + scale bytes in text_decoder.onnx x 8 / routed-expert weights; "
        "2 + 32/block for the ternary export (block = largest of 32..512 dividing K and the expert width)",
        f"latency: median (JSON also has min and sample counts); prefill = {m.prefill_len} tokens from input_pos 0, "
        f">= {m.prefill_repeats} runs; decode = one token per step at positions {m.decode_prefix}.."
        f"{m.last_decode_position} after a prefill (first {m.decode_warmup} steps of each round not timed), rounds "
        f"repeated until >= {m.min_seconds} s per session; static KV cache of {m.max_seq_len}; CPU EP, {threads} "
        f"intra-op thread(s); sessions timed round-robin",
    ]
    return {"settings": settings, "rows": rows, "scaling": scaling_rows(rows), "notes": notes}


ROW_COLUMNS = [
    Column("config", 20, lambda r: r["config"], left=True),
    Column("E", 3, lambda r: r["experts"]),
    # the QMoE scale block(s) of the ternary export; the fp32 baseline has none
    Column("blk", 4, lambda r: ",".join(str(b) for b in r["qmoe"].get("blocks", [])) or "-"),
    *variant_comparison_columns(SIZE_KEY),
]


def format_table(result: dict) -> str:
    st = result["settings"]
    return format_result(
        result, ROW_COLUMNS,
        "(x = fp32 / ternary; bits = routed-expert storage per weight; MB = text_decoder.onnx; blk = QMoE scale block)",
        SCALING_COLUMNS,
        [f"onnxruntime {st['onnxruntime']}, {st['machine']}, {st['cpus']} CPUs, intra-op threads "
         f"{st['threads']['intra_op']}, inter-op 1, sequential; {describe_run(st)}"])


def main(argv=None) -> int:
    return run_cli(argv, __doc__, run_benchmark, format_table,
                   quick_help="smaller models and fewer repeats (under a minute)",
                   threads_help="onnxruntime intra-op threads (default 1)")


if __name__ == "__main__":
    raise SystemExit(main())
