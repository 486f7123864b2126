"""Benchmark of the android target in ExecuTorch's runtime: 2-bit ternary experts vs float32 experts, same model.

    python -m mote.tools.bench_executorch [--quick] [--json out.json] [--threads 1]

For each expert count (random text-only MoTE models, top-1; default E=4 and 4E=16 experts) the same model is
lowered twice with the real `android` target: the deployable export (routed experts as 2-bit codes + fp32 scales,
decoded in the program by portable ops) and the benchmark baseline `experts="fp32"` (the same top-k gather over the
dequantized expert weights in float32, float activations). It reports

- the size of `model.pte` (token_embedding + text_decoder + the runner's constant methods) and the routed-expert
  bits per weight of both (`Lowered.routed_expert_bits_per_weight`, also counted in the `.pte`'s constants);
- prefill latency (T tokens from input_pos 0) and decode-step latency (one token per step after a prefill, the KV
  cache being the method's own mutable buffers) of the whole `text_decoder` method in `executorch.runtime`, medians;
- the expert-count scaling: latencies with 4E experts over E (top-1 reads one expert per token either way).

Lowering a `.pte` costs ~10-60 s per model (XNNPACK partitioning), so the benchmark lowers only 4 models
(2 variants x 2 expert counts) of one shape. All loaded programs are timed interleaved (round-robin), so background
load hits them alike. The XNNPACK threadpool is set to `--threads` (1 by default). Timings are reported, never checked.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

from mote.tools.bench_common import (SCALING_COLUMNS, SEPARATOR, VARIANTS, Column, Mode, ModelShape, RunClock,
                                     add_timings_and_ratios, describe_run, expert_scaling_rows, format_result,
                                     run_cli, time_interleaved, variant_comparison_columns)

FP32_BASELINE_NOTE = (
    "fp32 baseline (experts=\"fp32\", benchmark-only): the same model, router and top-k gather (index_select of "
    "the chosen experts, bmm), over the ternary experts dequantized to float32, with float activations (no "
    "activation quantization); attention, shared expert, router and lm head are the same XNNPACK fp32 delegates "
    "in both variants")
TERNARY_PATH_NOTE = (
    "ternary path: each call gathers the chosen experts' packed 2-bit codes and decodes them with portable "
    "ExecuTorch ops (a byte->4-trits table built in-graph, then an embedding gather per packed byte) before the "
    "bmm, plus per-token int8 activation quantization; "
    "this is unoptimised (no fused low-bit kernel), so it can be slower than fp32 here; the latencies below are "
    "measured as they are")

# .pte scalar types (executorch ScalarType) -> bytes per element, for counting constants read back from the file
_ELEMENT_SIZE = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 15: 2}


MODES = {
    # 4 lowerings of a d=256 model: a few minutes on 2 idle cores
    "default": Mode(shapes=(
        ModelShape("d=256 I_e=512", hidden=256, expert_intermediate=512, intermediate=512),
    ), max_seq_len=64, prefill_len=32, decode_prefix=16),
    # 4 lowerings of a 1-layer d=128 model (~40 s idle, ~90 s under load), few steps
    "quick": Mode(shapes=(
        ModelShape("quick d=128 I_e=256", hidden=128, expert_intermediate=256, intermediate=256, layers=1),
    ), max_seq_len=32, prefill_len=16, prefill_repeats=5, decode_prefix=8, decode_warmup=3, decode_steps=15),
    # the smoke test: 2 lowerings, no scaling, numbers meaningless
    "smoke": Mode(shapes=(
        ModelShape("smoke d=64", hidden=64, expert_intermediate=64, intermediate=128, layers=1, experts=(2,)),
    ), max_seq_len=16, prefill_len=4, prefill_warmup=1, prefill_repeats=2, decode_prefix=2, decode_warmup=1,
        decode_steps=3),
}
# the artifact whose size is compared between variants and expert counts (JSON: pte_bytes, pte_bytes_ratio)
SIZE_KEY = "pte_bytes"


def pte_routed_expert_bytes(pte_path: Path, num_experts: int) -> dict:
    """Routed-expert constants of `text_decoder` read back from the `.pte`.

    The gathered expert tensors are the plan's 3-D constants [E, rows, K or K/4] (uint8 codes or float32 weights) and
    the 2-D float scales [E, 1 or rows]; XNNPACK-delegated weights live in delegate blobs and are not counted.
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(pte_path.read_bytes()).program
    codes = floats = 0
    for plan in program.execution_plan:
        if plan.name != "text_decoder":
            continue
        for v in plan.values:
            t = v.val
            if type(t).__name__ != "Tensor" or t.data_buffer_idx <= 0 or not t.sizes or t.sizes[0] != num_experts:
                continue
            n = 1
            for s in t.sizes:
                n *= s
            dtype = int(t.scalar_type)
            if len(t.sizes) == 3 or (len(t.sizes) == 2 and dtype == 6):
                if dtype == 0:
                    codes += n
                else:
                    floats += n * _ELEMENT_SIZE.get(dtype, 4)
    return {"uint8_code_bytes": codes, "float_bytes": floats, "bytes": codes + floats}


def lower_variant(model, variant: str, max_seq_len: int, out_dir: Path):
    """torch.export + the pass pipeline + the android target's lower() (all programs of the text-only model)."""
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline
    from mote.targets import CommonOptions
    from mote.targets.executorch import TARGET

    # lower() rewrites the programs in place (fp32 baseline), so each variant exports its own (deterministic) copy
    programs = export_programs(model, max_seq_len, KVCacheStyle.STATE)
    programs, _ = run_pipeline(programs, model.config.moe.moe_layers, verify=False)
    return TARGET.lower(programs, model, CommonOptions(None, out_dir, max_seq_len, fp32_experts=variant == "fp32"))


def _delegation(lowered) -> dict | None:
    """The text_decoder entry of the target's delegation facts (XNNPACK delegate count, ops on portable kernels)."""
    return lowered.facts.get("delegation", {}).get("text_decoder")


class TimedDecoder:
    """The `.pte`'s text_decoder through the target's PteRunner; the KV cache is the method's mutable buffers."""

    def __init__(self, out_dir: Path, max_seq_len: int, hidden: int, seed: int):
        import torch

        from mote.targets.executorch import TARGET

        self.runner = TARGET.runner(out_dir, max_seq_len)
        self.gen = torch.Generator().manual_seed(seed)
        self.hidden = hidden
        self.pos = 0

    def _run(self, t: int, pos: int) -> float:
        import torch

        embeds = torch.randn(1, t, self.hidden, generator=self.gen)
        input_pos = torch.tensor([pos], dtype=torch.long)
        t0 = time.perf_counter()
        self.runner.text_decoder(embeds, input_pos)
        return time.perf_counter() - t0

    def prefill(self, t: int) -> float:
        """T tokens from position 0 (overwrites cache rows 0..T-1; later rows are masked by input_pos)."""
        return self._run(t, 0)

    def start_decode(self, prefix: int) -> None:
        self.runner.reset()          # a freshly loaded method: zeroed KV cache (not timed)
        self._run(prefix, 0)
        self.pos = prefix

    def decode_step(self) -> float:
        dt = self._run(1, self.pos)
        self.pos += 1
        return dt


def bench_shape(shape: ModelShape, mode: Mode, work: Path, log) -> list[dict]:
    from mote.tools.make_random_model import random_model

    rows, decoders = [], {}
    for experts in shape.experts:
        cfg = shape.config(experts, mode.max_seq_len)
        model = random_model(cfg, seed=0)
        row = {"config": shape.name, "hidden": shape.hidden, "expert_intermediate": shape.expert_intermediate,
               "shared_intermediate": shape.intermediate, "layers": shape.layers, "heads": shape.heads,
               "kv_heads": shape.kv_heads, "vocab": shape.vocab, "experts": experts, "top_k": shape.top_k,
               "parameters": model.config.parameter_count()}
        for variant in VARIANTS:
            out = Path(tempfile.mkdtemp(prefix=f"{variant}-E{experts}-", dir=work))
            t0 = time.perf_counter()
            lowered = lower_variant(model, variant, mode.max_seq_len, out)
            lower_s = time.perf_counter() - t0
            path = out / "model.pte"
            n = lowered.routed_expert_weights
            in_pte = pte_routed_expert_bytes(path, experts)
            facts = {"pte_bytes": path.stat().st_size, "routed_expert_weights": n,
                     "routed_expert_bytes": lowered.routed_expert_bytes,
                     "bits_per_weight": lowered.routed_expert_bits_per_weight,
                     # the same count from the constants stored in the file: reported must equal stored
                     "bits_per_weight_in_pte": in_pte["bytes"] * 8 / n,
                     "code_bits_per_weight_in_pte": in_pte["uint8_code_bytes"] * 8 / n,
                     "reported_matches_pte": in_pte["bytes"] == lowered.routed_expert_bytes,
                     "delegation": _delegation(lowered), "lower_s": round(lower_s, 1)}
            row[variant] = facts
            log(f"bench_executorch: {shape.name} E={experts} {variant}: lowered in {lower_s:.1f} s, "
                f"model.pte {facts['pte_bytes'] / 1e6:.2f} MB, {facts['bits_per_weight']:.4f} bits/weight "
                f"({facts['bits_per_weight_in_pte']:.4f} counted in the .pte)")
            decoders[(experts, variant)] = TimedDecoder(out, mode.max_seq_len, shape.hidden, seed=experts)
        del model
        rows.append(row)
    log(f"bench_executorch: {shape.name}: timing {len(decoders)} programs (prefill T={mode.prefill_len}, "
        f"{mode.decode_steps} decode steps)")
    # medians only: these modes time fixed counts (min_seconds 0), and the JSON keeps its keys
    add_timings_and_ratios(rows, time_interleaved(decoders, mode, with_min_and_count=False), SIZE_KEY)
    return rows


def scaling_rows(rows: list[dict]) -> list[dict]:
    """Per configuration benchmarked at several expert counts: the largest E against the smallest."""
    return expert_scaling_rows(rows, SIZE_KEY)


def delegation_notes(rows: list[dict]) -> list[str]:
    """What differs between the variants' text_decoder on the portable kernels (from the target's delegation facts)."""
    if not rows or not rows[0]["qmoe"]["delegation"] or not rows[0]["fp32"]["delegation"]:
        return []
    t, f = rows[0]["qmoe"]["delegation"], rows[0]["fp32"]["delegation"]
    tp, fp = t["portable_ops"], f["portable_ops"]
    more = [f"{o.split('.')[0]} {n}" + (f" (fp32: {fp[o]})" if o in fp else "")
            for o, n in sorted(tp.items()) if n > fp.get(o, 0) and o not in ("alloc", "view")]
    bmm = "bmm" in " ".join(tp) or "bmm" in " ".join(fp)
    return [f"text_decoder ({rows[0]['config']}, E={rows[0]['experts']}): {t['xnnpack_delegates']} XNNPACK "
            f"delegate calls ternary vs {f['xnnpack_delegates']} fp32; extra portable-kernel ops in the ternary "
            f"variant: {', '.join(more) or 'none'}; the expert bmm is "
            f"{'partly on portable kernels' if bmm else 'delegated to XNNPACK (fp32) in both variants'}"]


def run_benchmark(mode: str = "default", threads: int = 1, work_dir: Path | None = None, log=None) -> dict:
    """The whole benchmark; returns a JSON-able dict with `settings`, `rows`, `scaling` and `notes`."""
    from importlib.metadata import PackageNotFoundError, version

    from executorch.extension.pybindings import portable_lib

    log = log or (lambda msg: None)
    m = MODES[mode]
    clock = RunClock()
    # XNNPACK's (and ExecuTorch's parallel_for's) threadpool; set before any program is loaded
    portable_lib._unsafe_reset_threadpool(threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mote-bench-et-", dir=work_dir) as work:
        for shape in m.shapes:
            rows += bench_shape(shape, m, Path(work), log)
    last_pos = m.last_decode_position
    try:
        et_version = version("executorch")
    except PackageNotFoundError:
        et_version = "unknown"
    settings = {"mode": mode, "threads": portable_lib._threadpool_get_thread_count(), "executorch": et_version,
                "machine": platform.machine(), "cpus": os.cpu_count(), "max_seq_len": m.max_seq_len,
                "prefill_len": m.prefill_len, "prefill_repeats": m.prefill_repeats, "decode_prefix": m.decode_prefix,
                "decode_warmup": m.decode_warmup, "decode_steps": m.decode_steps,
                "decode_positions": [m.decode_prefix, last_pos], **clock.settings()}
    notes = [
        FP32_BASELINE_NOTE,
        TERNARY_PATH_NOTE,
        "bits/weight = routed-expert code + scale bytes x 8 / routed-expert weights, as the target reports it "
        "(Lowered.routed_expert_bits_per_weight) and as counted in the .pte's text_decoder constants "
        "(JSON: bits_per_weight_in_pte, reported_matches_pte); these random models have per-tensor scales "
        "(32 / (rows x K) bits each), so the ternary figure is ~2.0 at this width and at realistic widths alike",
        "MB = the whole model.pte: token_embedding (fp32 embedding table) + text_decoder (attention, fp32 shared "
        "expert, router, lm head, routed experts) + constant methods; only the routed experts differ",
        f"latency: median of the whole text_decoder method in executorch.runtime (Python call included); prefill = "
        f"{m.prefill_len} tokens from input_pos 0 ({m.prefill_repeats} timed after {m.prefill_warmup} warm-up); "
        f"decode = one token per step at positions {m.decode_prefix}..{last_pos} after a {m.decode_prefix}-token "
        f"prefill (first {m.decode_warmup} steps not timed); static KV cache of {m.max_seq_len}; "
        f"threadpool {settings['threads']} thread(s); programs timed round-robin",
        "both variants decode each chosen expert once per call and run every token through each chosen expert "
        "(targets/executorch/decompose.py: memory bounded by the expert count, at most E / k times the routed "
        "prefill work); the expert matmuls, whose expert count is data-dependent, run on portable bmm",
    ]
    notes += delegation_notes(rows)
    return {"settings": settings, "rows": rows, "scaling": scaling_rows(rows), "notes": notes}


ROW_COLUMNS = [
    Column("config", 22, lambda r: r["config"], left=True),
    Column("E", 3, lambda r: r["experts"]),
    *variant_comparison_columns(SIZE_KEY),
]
# plus the .pte's size ratio (the ONNX table leaves its onnx_bytes_ratio to the JSON)
EXECUTORCH_SCALING_COLUMNS = [*SCALING_COLUMNS, SEPARATOR,
                              Column("MB 4E/E", 7, lambda s: s[f"{SIZE_KEY}_ratio"], ".2f")]


def format_table(result: dict) -> str:
    st = result["settings"]
    shapes = {(r["config"], r["hidden"], r["expert_intermediate"], r["shared_intermediate"], r["layers"], r["heads"],
               r["kv_heads"], r["vocab"], r["top_k"]) for r in result["rows"]}
    models = [f"model {c}: hidden {d}, expert intermediate {ie}, shared intermediate {i}, {n} layers, "
              f"{h} heads ({kv} kv), vocab {v}, top-{k}" for c, d, ie, i, n, h, kv, v, k in sorted(shapes)]
    return format_result(
        result, ROW_COLUMNS,
        "(x = fp32 / ternary, > 1 means ternary smaller/faster; bits = routed-expert storage per weight; "
        "MB = model.pte)",
        EXECUTORCH_SCALING_COLUMNS,
        models + [f"executorch {st['executorch']}, {st['machine']}, {st['cpus']} CPUs, threadpool {st['threads']}; "
                  f"{describe_run(st)}"])


def main(argv=None) -> int:
    return run_cli(argv, __doc__, run_benchmark, format_table,
                   quick_help="a 1-layer d=128 model and few repeats (~1 minute)",
                   threads_help="ExecuTorch threadpool size (default 1)")


if __name__ == "__main__":
    raise SystemExit(main())
