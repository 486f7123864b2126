"""`mote-bench --target T`: ternary vs float32 routed experts of the same model, in the target's own runtime.

    mote-bench --target {android,ios,onnx,tvm} [--quick] [--profile] [--quantize SPEC] [--json out.json]
               [--threads 1 2] [--work-dir DIR] [-v] [the target's mote-export flags, e.g. --int8-activations]

Every target of the registry is benchmarked the same way, through the target contract only (targets/base.py):

- each random text-only MoTE model (`ModelShape`, top-1) is built at E and 4E routed experts (default 4 and 16) and
  lowered twice with `target.lower`: the deployable export (`VARIANTS`: "ternary") and the benchmark-only baseline
  `CommonOptions(fp32_experts=True)` ("fp32": the same experts dequantized to float32, same routing, same runtime),
  with the target's `Options.for_benchmark()`;
- size: the artifact (every file `Lowered.artifacts` names) and the routed experts' storage read back from it with
  `target.routed_expert_storage` (bits per weight = its bytes x 8 / `Lowered.routed_expert_weights`; the JSON also
  says whether it equals what `lower` reported);
- latency, for each thread count (default 1 and 2): the text decoders are loaded with `target.runner(out_dir,
  max_seq_len, threads)` and timed round-robin (`time_interleaved`) so that background load hits all of them alike:
  prefill (T tokens from input_pos 0) and decode steps (one token, after a prefill) of the whole `text_decoder`,
  Python call included, medians;
- `--profile`: the runtime's own profiler (`target.op_profile`: ORT's trace, ExecuTorch's ETDump) over decode steps
  of each variant at the smallest expert count, first thread count: the operator kinds that take the time;
- the target's own kernels alone, where it ships any (`target.kernel_benchmark`: our ExecuTorch kernel library),
  ternary vs fp32 and against the memory-bandwidth bound;
- ratios, computed from those numbers only: fp32 over ternary (size and latency) and 4E over E (expert-count
  scaling; top-1 reads one expert per token either way).
- `--quantize SPEC`: the "ternary" variant also has its full-precision parts quantized as `mote-export --quantize`
  does (the model saved, then loaded with the spec: quantized as read); the "fp32" baseline stays all float32. This
  is the paper's deployment (ternary experts + PTQ of the rest) against the fp32-expert model.

Progress goes to stderr, the tables to stdout, `--json` writes everything. `--quick` is the smoke test's setting
(tiny models, few repeats, numbers meaningless). Timings are reported, never checked. The thread counts are timed
one after the other (ExecuTorch's threadpool is process-wide), each with freshly loaded runners.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PROG = "mote-bench"
# "ternary" is the deployable export; "fp32" the benchmark-only baseline with the same experts dequantized
VARIANTS = ("ternary", "fp32")
DEFAULT_THREADS = (1, 2)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A random text-only MoTE (make_random_model.random_config arguments), benchmarked at each routed-expert count."""

    name: str
    hidden: int
    expert_intermediate: int
    intermediate: int          # the shared expert (the backbone's dense FFN, kept fp32)
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 260
    experts: tuple[int, ...] = (4, 16)   # E and 4E: the expert-count scaling
    top_k: int = 1

    def config(self, experts: int, max_positions: int) -> dict:
        from mote.tools.make_random_model import random_config

        return random_config(hidden=self.hidden, layers=self.layers, heads=self.heads, kv_heads=self.kv_heads,
                             intermediate=self.intermediate, vocab=self.vocab, experts=experts, top_k=self.top_k,
                             expert_intermediate=self.expert_intermediate, vision=False, max_positions=max_positions)

    def facts(self) -> dict:
        return {"config": self.name, "hidden": self.hidden, "expert_intermediate": self.expert_intermediate,
                "shared_intermediate": self.intermediate, "layers": self.layers, "heads": self.heads,
                "kv_heads": self.kv_heads, "vocab": self.vocab, "top_k": self.top_k}


@dataclasses.dataclass(frozen=True)
class Mode:
    """The models of one benchmark mode and how they are timed (see `time_interleaved`)."""

    shapes: tuple[ModelShape, ...]
    max_seq_len: int                 # the static KV cache
    prefill_len: int                 # timed prefill: T tokens from input_pos 0
    decode_prefix: int               # untimed prefill before each round of decode steps
    prefill_warmup: int = 2
    prefill_repeats: int = 10        # at least; more until each decoder spent min_seconds (or max_prefill_repeats)
    decode_warmup: int = 5           # untimed steps at the start of each round
    decode_steps: int = 30           # timed steps per round; more rounds until min_seconds (or max_decode_rounds)
    min_seconds: float = 0.0         # 0: exactly prefill_repeats prefills and one decode round
    max_prefill_repeats: int = 200
    max_decode_rounds: int = 10

    def __post_init__(self):
        assert self.prefill_len <= self.max_seq_len
        assert self.last_decode_position < self.max_seq_len, "decode past the cache"

    @property
    def last_decode_position(self) -> int:
        return self.decode_prefix + self.decode_warmup + self.decode_steps - 1

    def settings(self) -> dict:
        return {"max_seq_len": self.max_seq_len, "prefill_len": self.prefill_len,
                "prefill_warmup": self.prefill_warmup, "prefill_repeats_min": self.prefill_repeats,
                "decode_prefix": self.decode_prefix, "decode_warmup": self.decode_warmup,
                "decode_steps_per_round": self.decode_steps, "min_seconds_per_decoder": self.min_seconds,
                "decode_positions": [self.decode_prefix, self.last_decode_position]}


MODES = {
    # The README's figures: 8 lowerings per target (2 shapes x E, 4E x 2 variants), each thread count timed for >= 1 s
    # per decoder. On 2 idle cores: onnx 2 min, android 3.5 min (ExecuTorch's graph passes: 13-22 s per lowering).
    "default": Mode(shapes=(
        ModelShape("example (d=128)", hidden=128, expert_intermediate=256, intermediate=256),   # the example's widths
        ModelShape("realistic (d=1024)", hidden=1024, expert_intermediate=1536, intermediate=2816, heads=8,
                   vocab=1024),
    ), max_seq_len=128, prefill_len=64, decode_prefix=64, decode_steps=50, min_seconds=1.0),
    # The smoke test (tests/test_bench_smoke.py): 4 tiny lowerings, fixed small repeat counts, numbers meaningless.
    # Widths of 128: whole vectors of 2-bit codes for every target's kernels (the TVM kernels pad rows to 128 weights).
    "quick": Mode(shapes=(
        ModelShape("quick (d=128)", hidden=128, expert_intermediate=128, intermediate=128, layers=1, vocab=256,
                   experts=(2, 8)),
    ), max_seq_len=16, prefill_len=4, decode_prefix=2, prefill_warmup=1, prefill_repeats=2, decode_warmup=1,
        decode_steps=3),
}


# ---------------------------------------------------------------------------------------------------------- timing

class TimedDecoder:
    """A runner's text_decoder (any target: the `Runner` protocol), driven with random embeddings.

    Decoders built with the same seed get the same inputs, so the two variants of a model route alike."""

    def __init__(self, runner, hidden: int, seed: int):
        import torch

        self.runner = runner
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
        """T tokens from position 0: cache rows 0..T-1 are written, later ones masked, whatever the cache held."""
        return self._run(t, 0)

    def start_decode(self, prefix: int) -> None:
        self.runner.reset()          # an empty KV cache (not timed)
        self._run(prefix, 0)
        self.pos = prefix

    def decode_step(self) -> float:
        dt = self._run(1, self.pos)
        self.pos += 1
        return dt


def time_interleaved(decoders: dict, mode: Mode) -> dict:
    """Prefill and decode-step latencies (ms: median and min, and the sample count) per decoder.

    A decoder has `prefill(t) -> seconds`, `start_decode(prefix)` and `decode_step() -> seconds`. The decoders are
    timed round-robin so that background load hits them alike. Prefill: at least `prefill_repeats` samples, more (up
    to `max_prefill_repeats`) until every decoder has spent `min_seconds`. Decode: rounds of an untimed
    `decode_prefix`-token prefill then `decode_warmup` untimed + `decode_steps` timed steps (the positions must stay
    inside the static cache), at least one round, more (up to `max_decode_rounds`) likewise.
    """
    prefill = {k: [] for k in decoders}
    for _ in range(mode.prefill_warmup):
        for d in decoders.values():
            d.prefill(mode.prefill_len)
    while True:
        for k, d in decoders.items():
            prefill[k].append(d.prefill(mode.prefill_len))
        n = len(next(iter(prefill.values())))
        if n >= mode.max_prefill_repeats or (
                n >= mode.prefill_repeats and min(sum(v) for v in prefill.values()) >= mode.min_seconds):
            break
    decode = {k: [] for k in decoders}
    for _ in range(mode.max_decode_rounds):
        for d in decoders.values():
            d.start_decode(mode.decode_prefix)
        for s in range(mode.decode_warmup + mode.decode_steps):
            for k, d in decoders.items():
                dt = d.decode_step()
                if s >= mode.decode_warmup:
                    decode[k].append(dt)
        if min(sum(v) for v in decode.values()) >= mode.min_seconds:
            break

    def stats(samples: list[float], what: str) -> dict:
        return {f"{what}_ms": 1e3 * statistics.median(samples), f"{what}_min_ms": 1e3 * min(samples),
                f"{what}_samples": len(samples)}

    return {k: {**stats(prefill[k], "prefill"), **stats(decode[k], "decode")} for k in decoders}


# --------------------------------------------------------------------------------------------------------- ratios

def size_ratios(row: dict) -> None:
    """fp32 over ternary, for the sizes of a row (both variants' facts are in it)."""
    t, f = row["ternary"], row["fp32"]
    row["bits_ratio_fp32_over_ternary"] = f["bits_per_weight"] / t["bits_per_weight"]
    row["routed_expert_bytes_ratio_fp32_over_ternary"] = f["routed_expert_bytes"] / t["routed_expert_bytes"]
    row["artifact_bytes_ratio_fp32_over_ternary"] = f["artifact_bytes"] / t["artifact_bytes"]
    # what the ratio would be if a decode step took the time of its weight reads (both variants read the same
    # float32 dense weights; only their routed storage differs)
    row["decode_weight_bytes"] = {v: decode_weight_bytes(row, v) for v in VARIANTS}
    row["decode_weight_bytes_ratio_fp32_over_ternary"] = (row["decode_weight_bytes"]["fp32"]
                                                          / row["decode_weight_bytes"]["ternary"])


def decode_weight_bytes(row: dict, variant: str) -> float:
    """Weight bytes one decode step reads: every weight but the routed experts once, as the variant stores it (the
    memory plan of the lowered model: float32, or --quantize's bits + scales; the benchmark's models are text-only,
    and a tied embedding is read as the lm head, an untied one only one row per token), and top_k / E of the routed
    storage read back from the artifact (the chosen expert of each MoE layer)."""
    return row[variant]["dense_decode_bytes"] + row[variant]["routed_expert_bytes"] * row["top_k"] / row["experts"]


def dense_decode_bytes(config, quantization) -> int:
    """The non-routed weight bytes of one decode step, from the memory plan (export/memory_plan.py)."""
    from mote.export.memory_plan import plan

    p = plan(config, quantization).exported
    embed = 0 if p["lm_head"] == 0 else p["embed"]    # an untied embedding is gathered: one row per token
    return sum(p.values()) - p["routed"] - embed


def latency_entry(threads: int, ternary: dict, fp32: dict) -> dict:
    """One thread count's latencies of a row's two variants, and their fp32 over ternary ratios."""
    return {"threads": threads, "ternary": ternary, "fp32": fp32,
            "prefill_ratio_fp32_over_ternary": fp32["prefill_ms"] / ternary["prefill_ms"],
            "decode_ratio_fp32_over_ternary": fp32["decode_ms"] / ternary["decode_ms"]}


def expert_scaling_rows(rows: list[dict]) -> list[dict]:
    """Per configuration benchmarked at several expert counts, variant and thread count: largest E over smallest."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["experts"])
        if len(mine) < 2:
            continue
        small, big = mine[0], mine[-1]
        for variant in VARIANTS:
            s, b = small[variant], big[variant]
            sizes = {"routed_expert_bytes_ratio": b["routed_expert_bytes"] / s["routed_expert_bytes"],
                     "artifact_bytes_ratio": b["artifact_bytes"] / s["artifact_bytes"]}
            for ls, lb in zip(small["latency"], big["latency"]):
                assert ls["threads"] == lb["threads"]
                ts, tb = ls[variant], lb[variant]
                out.append({"config": config, "variant": variant, "threads": ls["threads"],
                            "experts": small["experts"], "experts_scaled": big["experts"], "top_k": small["top_k"],
                            "decode_ms": ts["decode_ms"], "decode_ms_scaled": tb["decode_ms"],
                            "decode_ratio": tb["decode_ms"] / ts["decode_ms"],
                            "prefill_ms": ts["prefill_ms"], "prefill_ms_scaled": tb["prefill_ms"],
                            "prefill_ratio": tb["prefill_ms"] / ts["prefill_ms"], **sizes})
    return out


# ------------------------------------------------------------------------------------------------------ benchmark

def quantized(model, spec: str, work: Path):
    """The same model with --quantize SPEC, as mote-export builds it: saved, then loaded quantizing as it reads."""
    from mote.export.loader import load_model, save_model
    from mote.export.quantization import parse

    d = Path(tempfile.mkdtemp(prefix="model-", dir=work))
    save_model(model, d)
    return load_model(d, parse(spec))


def lower(target, model, variant: str, max_seq_len: int, out_dir: Path, options=None):
    """torch.export + the pass pipeline + `target.lower` (every program of the text-only model), as mote-export
    does, without verification. Each variant exports its own (deterministic) programs: lower() rewrites them."""
    from mote.export.programs import export_programs
    from mote.passes.pipeline import run_pipeline
    from mote.targets import CommonOptions

    programs = export_programs(model, max_seq_len, target.kv_style)
    programs, _ = run_pipeline(programs, model.config.moe.moe_layers, verify=False)
    common = CommonOptions(model_dir=None, out_dir=out_dir, max_seq_len=max_seq_len, verify=False,
                           fp32_experts=variant == "fp32")
    return target.lower(programs, model, common, options or target.Options.for_benchmark())


def variant_facts(target, lowered, out_dir: Path, lower_s: float) -> dict:
    """Size of what `lower` wrote, the routed experts' storage read back from the artifact by the target."""
    from mote.targets import artifact_bytes

    storage = target.routed_expert_storage(out_dir)
    n = lowered.routed_expert_weights
    files = {str(p.relative_to(out_dir)): artifact_bytes(p) for p in lowered.artifacts}
    return {"artifacts": files, "artifact_bytes": sum(files.values()),
            "routed_expert_weights": n, "routed_expert_bytes": storage.bytes,
            "routed_expert_tensors": storage.tensors, "routed_expert_where": storage.where,
            "bits_per_weight": storage.bytes * 8 / n,
            # what lower() reported (report.json's figure) against what the artifact holds
            "reported_routed_expert_bytes": lowered.routed_expert_bytes,
            "reported_matches_artifact": lowered.routed_expert_bytes == storage.bytes,
            "deviations": list(lowered.deviations), "lower_s": round(lower_s, 1)}


def bench_shape(target, shape: ModelShape, mode: Mode, threads: tuple[int, ...], work: Path, log,
                profile: bool = False, quantize: str | None = None, options=None) -> list[dict]:
    """Lower each expert count x variant, then per thread count time all their decoders together (and profile the
    smallest expert count's)."""
    from mote.export.quantization import parse
    from mote.targets import quiet_toolchain
    from mote.tools.make_random_model import random_model

    rows, out_dirs = [], {}
    for experts in shape.experts:
        model = random_model(shape.config(experts, mode.max_seq_len), seed=0)
        models = {"ternary": quantized(model, quantize, work) if quantize else model, "fp32": model}
        row = {**shape.facts(), "experts": experts, "parameters": model.config.parameter_count(),
               "quantize": quantize}
        for variant in VARIANTS:
            out = Path(tempfile.mkdtemp(prefix=f"{variant}-E{experts}-", dir=work))
            t0 = time.perf_counter()
            with quiet_toolchain():
                lowered = lower(target, models[variant], variant, mode.max_seq_len, out, options)
            row[variant] = variant_facts(target, lowered, out, time.perf_counter() - t0)
            row[variant]["dense_decode_bytes"] = dense_decode_bytes(
                model.config, parse(quantize) if quantize and variant == "ternary" else None)
            del lowered
            f = row[variant]
            log(f"{shape.name} E={experts} {variant}: lowered in {f['lower_s']:.1f} s, {f['artifact_bytes'] / 1e6:.2f}"
                f" MB, routed experts {f['bits_per_weight']:.4f} bits/weight")
            out_dirs[(experts, variant)] = out
        del model, models
        gc.collect()
        size_ratios(row)
        row["latency"] = []
        rows.append(row)
    for n in threads:
        log(f"{shape.name}: timing {len(out_dirs)} decoders with {n} thread(s) (prefill T={mode.prefill_len}, "
            f"decode rounds of {mode.decode_steps} steps, >= {mode.min_seconds} s each)")
        # same seed for both variants of an expert count: the same input embeddings, so the same routing
        decoders = {key: TimedDecoder(target.runner(out, mode.max_seq_len, threads=n), shape.hidden, seed=key[0])
                    for key, out in out_dirs.items()}
        times = time_interleaved(decoders, mode)
        del decoders          # released before the next thread count loads its own (ExecuTorch: one threadpool)
        gc.collect()
        for row in rows:
            e = row["experts"]
            row["latency"].append(latency_entry(n, times[(e, "ternary")], times[(e, "fp32")]))
    if profile:
        row = rows[0]
        log(f"{shape.name} E={row['experts']}: profiling {mode.decode_steps} decode steps per variant")
        row["profile"] = {"threads": threads[0], "decode_steps": mode.decode_steps,
                          **{v: profile_decode(target, out_dirs[(row["experts"], v)], shape.hidden, mode, threads[0])
                             for v in VARIANTS}}
    return rows


def profile_decode(target, out_dir: Path, hidden: int, mode: Mode, threads: int) -> dict | None:
    """Operator kinds by time per decode step (positions 0.. from an empty cache), from the runtime's profiler."""
    def drive(runner):
        decoder = TimedDecoder(runner, hidden, seed=0)
        for _ in range(mode.decode_steps):
            decoder.decode_step()

    ops = target.op_profile(out_dir, mode.max_seq_len, threads, drive)
    if ops is None:
        return None
    n = mode.decode_steps
    return {"profiled_ms_per_step": sum(o.ms for o in ops) / n,
            "ops": [{"kind": o.kind, "ms_per_step": o.ms / n, "calls_per_step": o.calls / n} for o in ops]}


def run_benchmark(target_name: str, mode: str = "default", threads: tuple[int, ...] = DEFAULT_THREADS,
                  work_dir: Path | None = None, log: Callable[[str], None] | None = None,
                  profile: bool = False, quantize: str | None = None, options=None) -> dict:
    """`options`: the target's options (default: `Options.for_benchmark()`), e.g. with its command-line flags."""
    """The whole benchmark of one target: a JSON-able dict with `target`, `settings`, `rows`, `scaling`, `notes`."""
    from mote.targets import get_target

    log = log or (lambda msg: None)
    target = get_target(target_name)
    if not target.fp32_experts_supported:
        raise ValueError(f"target {target_name} cannot lower the fp32-expert baseline (Target.fp32_experts_supported)")
    m = MODES[mode]
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mote-bench-", dir=work_dir) as work:
        for shape in m.shapes:
            rows += bench_shape(target, shape, m, tuple(threads), Path(work), log, profile, quantize, options)
    kernels = None
    log(f"{target_name}: its own kernels alone, if it has any (target.kernel_benchmark)")
    if (timed := target.kernel_benchmark(tuple(threads), quick=mode == "quick")) is not None:
        kernels = {"times": [dataclasses.asdict(t) for t in timed[0]],
                   "bandwidth_bound": [dataclasses.asdict(b) for b in timed[1]]}
    import torch

    settings = {"mode": mode, "threads": list(threads), "profile": profile, "quantize": quantize,
                "options": (options or target.Options.for_benchmark()).as_dict(),
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             **target.runtime_versions()},
                "machine": platform.machine(), "cpus": os.cpu_count(), **m.settings(),
                "wall_s": round(time.perf_counter() - started, 1),
                "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    return {"target": target_name, "settings": settings, "rows": rows, "scaling": expert_scaling_rows(rows),
            "kernels": kernels, "notes": notes(target_name, m, rows, kernels, quantize)}


def notes(target_name: str, m: Mode, rows: list[dict], kernels: dict | None = None,
          quantize: str | None = None) -> list[str]:
    from mote.targets import get_target

    caveat = get_target(target_name).timing_caveat
    out = [f"latency is {caveat}"] if caveat else []
    out += [
        "fp32 = the same model with its ternary routed experts dequantized to float32 (CommonOptions.fp32_experts), "
        "same router, attention, shared expert and lm head, same runtime: only the routed experts differ"
        if quantize is None else
        f"tern = ternary routed experts and --quantize {quantize} for the full-precision parts (the model as "
        "mote-export --quantize builds it); fp32 = the same model with every weight in float32 (routed experts "
        "dequantized, nothing quantized), same runtime",
        "bits/w = routed-expert storage (codes + scales) read back from the artifact (target.routed_expert_storage) "
        "x 8 / routed-expert weights; experts MB = that storage; artifact MB = every file target.lower wrote",
        f"latency: median of the whole text_decoder through target.runner (Python call included); prefill = "
        f"{m.prefill_len} tokens from input_pos 0 (>= {m.prefill_repeats} runs after {m.prefill_warmup} warm-up); "
        f"decode = one token per step at positions {m.decode_prefix}..{m.last_decode_position} after a "
        f"{m.decode_prefix}-token prefill (first {m.decode_warmup} steps of each round not timed)"
        + (f", rounds repeated until >= {m.min_seconds} s per decoder" if m.min_seconds else "")
        + f"; static KV cache of {m.max_seq_len}; all decoders of a model timed round-robin, one thread count "
          "after the other",
    ]
    out.append("bytes x = the decode ratio if a step took the time of its weight reads: fp32 / ternary bytes read per "
               "step (every non-routed weight once as the variant stores it, plus top_k / E of the routed storage in "
               "the artifact)")
    float_bits = sorted({r["fp32"]["bits_per_weight"] for r in rows} - {32.0})
    if float_bits:
        bits = "/".join(f"{b:g}" for b in float_bits)
        out.append(f"the fp32 variant's experts are stored at {bits} bits per weight: {target_name}'s programs hold "
                   "their float weights in the precision they compute in")
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        p = profiled[0]["profile"]
        if all(r["profile"][v] is None for r in profiled for v in VARIANTS):
            out.append(f"--profile: {target_name}'s runtime has no profiler here (target.op_profile)")
        else:
            out.append(f"top ops: the runtime's own profiler (target.op_profile) over {p['decode_steps']} decode steps "
                       f"at positions 0..{p['decode_steps'] - 1} from an empty cache, {p['threads']} thread(s), "
                       "smallest expert count; times per step, summed by operator kind without nesting records; "
                       "share = of the profiled operators' time (profiling adds overhead)")
    # the targets' own words on where their kernels depart from the reference (report.json's deviations)
    for variant in VARIANTS:
        for d in dict.fromkeys(d for r in rows for d in r[variant]["deviations"]):
            out.append(f"{target_name} {variant} export: {d}")
    if kernels:
        out.append(f"kernels alone: {target_name}'s own kernels timed outside the runtime (target.kernel_benchmark), "
                   "medians; fp32 = the same routed experts in float32 through the same routing; bound = bytes one "
                   "decode call must read / the read bandwidth measured here with the same threads (time/bound 1.0: "
                   "as fast as the memory delivers the bytes)")
    if not all(r[v]["reported_matches_artifact"] for r in rows for v in VARIANTS):
        out.append("the routed-expert bytes target.lower reported differ from those read back from the artifact "
                   "(JSON: reported_routed_expert_bytes)")
    return out


# ---------------------------------------------------------------------------------------------------------- table

@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a fixed-width text table; cells are `format(value(record), fmt)` padded to `width`."""

    header: str
    width: int
    value: Callable[[dict], object]
    fmt: str = ""
    left: bool = False           # left-aligned (names), else right-aligned (numbers)

    def pad(self, text: str) -> str:
        return f"{text:{'<' if self.left else '>'}{self.width}}"


# between column groups; a column of its own so that header and cells line up
SEPARATOR = Column("|", 1, lambda _: "|")


def table_lines(columns: list[Column], records: list[dict]) -> list[str]:
    header = " ".join(c.pad(c.header) for c in columns)
    return [header, "-" * len(header)] + [" ".join(c.pad(format(c.value(r), c.fmt)) for c in columns)
                                          for r in records]


def _mb(key: str) -> Callable[[dict], float]:
    return lambda v: v[key] / 1e6


def _triple(header: str, width: int, value: Callable[[dict], float], fmt: str, ratio_key: str) -> list[Column]:
    """ternary, fp32 and the fp32 / ternary ratio of one quantity."""
    return [Column(header, width, lambda r: value(r["ternary"]), fmt),
            Column("fp32", 8, lambda r: value(r["fp32"]), fmt),
            Column("x", 6, lambda r: r[ratio_key], ".2f")]


NAME_WIDTH = 20
SIZE_COLUMNS = [
    Column("size", NAME_WIDTH, lambda r: r["config"], left=True),
    Column("E", 3, lambda r: r["experts"]),
    SEPARATOR, *_triple("bits/w tern", 11, lambda v: v["bits_per_weight"], ".4f", "bits_ratio_fp32_over_ternary"),
    SEPARATOR, *_triple("experts MB tern", 15, _mb("routed_expert_bytes"), ".2f",
                        "routed_expert_bytes_ratio_fp32_over_ternary"),
    SEPARATOR, *_triple("artifact MB tern", 16, _mb("artifact_bytes"), ".2f", "artifact_bytes_ratio_fp32_over_ternary"),
]
LATENCY_COLUMNS = [
    Column("latency", NAME_WIDTH, lambda r: r["config"], left=True),
    Column("E", 3, lambda r: r["experts"]),
    Column("thr", 3, lambda r: r["threads"]),
    SEPARATOR, *_triple("prefill ms tern", 15, lambda v: v["prefill_ms"], ".3f", "prefill_ratio_fp32_over_ternary"),
    SEPARATOR, *_triple("decode ms tern", 14, lambda v: v["decode_ms"], ".3f", "decode_ratio_fp32_over_ternary"),
    Column("bytes x", 7, lambda r: r["decode_weight_bytes_ratio_fp32_over_ternary"], ".2f"),
]
SCALING_COLUMNS = [
    Column("expert-count scaling", NAME_WIDTH, lambda s: s["config"], left=True),
    Column("variant", 7, lambda s: s["variant"], left=True),
    Column("thr", 3, lambda s: s["threads"]),
    Column("E -> 4E", 8, lambda s: f"{s['experts']} -> {s['experts_scaled']}"),
    SEPARATOR,
    Column("decode ms E", 11, lambda s: s["decode_ms"], ".3f"),
    Column("4E", 8, lambda s: s["decode_ms_scaled"], ".3f"),
    Column("4E/E", 6, lambda s: s["decode_ratio"], ".2f"),
    SEPARATOR,
    Column("prefill ms E", 12, lambda s: s["prefill_ms"], ".3f"),
    Column("4E", 8, lambda s: s["prefill_ms_scaled"], ".3f"),
    Column("4E/E", 6, lambda s: s["prefill_ratio"], ".2f"),
    SEPARATOR,
    Column("experts MB 4E/E", 15, lambda s: s["routed_expert_bytes_ratio"], ".2f"),
    Column("artifact 4E/E", 13, lambda s: s["artifact_bytes_ratio"], ".2f"),
]


KERNEL_COLUMNS = [
    Column("kernels alone", NAME_WIDTH, lambda k: k["isa"], left=True),
    Column("thr", 3, lambda k: k["threads"]),
    Column("op", 56, lambda k: k["op"], left=True),
    Column("tokens", 6, lambda k: k["tokens"]),
    SEPARATOR,
    Column("ternary ms", 10, lambda k: k["ternary_ms"], ".4f"),
    Column("fp32 ms", 8, lambda k: "-" if k["fp32_ms"] is None else f"{k['fp32_ms']:.4f}"),
    Column("x", 6, lambda k: "-" if k["fp32_ms"] is None else f"{k['fp32_ms'] / k['ternary_ms']:.2f}"),
]
BOUND_COLUMNS = [
    Column("bandwidth bound", NAME_WIDTH, lambda b: b["isa"], left=True),
    Column("thr", 3, lambda b: b["threads"]),
    Column("shape", 56, lambda b: b["shape"], left=True),
    SEPARATOR,
    Column("MB/call", 8, lambda b: b["bytes_per_call"] / 1e6, ".2f"),
    Column("ms/call", 8, lambda b: b["ms_per_call"], ".3f"),
    Column("read GB/s", 9, lambda b: b["read_gb_s"], ".2f"),
    Column("time/bound", 10, lambda b: b["time_over_bound"], ".2f"),
]


PROFILE_TOP = 8   # operator kinds shown per variant (the JSON has all)
PROFILE_COLUMNS = [
    Column("top ops (decode)", NAME_WIDTH, lambda o: o["config"], left=True),
    Column("E", 3, lambda o: o["experts"]),
    Column("variant", 7, lambda o: o["variant"], left=True),
    SEPARATOR,
    Column("operator (runtime's name)", 40, lambda o: o["kind"][:40], left=True),
    Column("ms/step", 8, lambda o: o["ms_per_step"], ".3f"),
    Column("calls/step", 10, lambda o: o["calls_per_step"], ".1f"),
    Column("share", 6, lambda o: f"{o['share']:.0%}"),
]


def profile_records(rows: list[dict]) -> list[dict]:
    """The top operator kinds of each profiled variant, with their share of the profiled time."""
    records = []
    for r in rows:
        for variant in VARIANTS:
            p = (r.get("profile") or {}).get(variant)
            for op in (p["ops"][:PROFILE_TOP] if p else []):
                records.append({"config": r["config"], "experts": r["experts"], "variant": variant, **op,
                                "share": op["ms_per_step"] / p["profiled_ms_per_step"]})
    return records


def latency_records(rows: list[dict]) -> list[dict]:
    """One record per row and thread count (the latency table's lines)."""
    return [{"config": r["config"], "experts": r["experts"],
             "decode_weight_bytes_ratio_fp32_over_ternary": r["decode_weight_bytes_ratio_fp32_over_ternary"], **entry}
            for r in rows for entry in r["latency"]]


def format_table(result: dict) -> str:
    """The same tables for every target: sizes, latencies, expert-count scaling, then the models, environment, notes."""
    st, rows = result["settings"], result["rows"]
    what = (f"ternary + --quantize {st['quantize']} vs all-fp32" if st.get("quantize")
            else "ternary vs fp32 routed experts")
    lines = [f"{PROG} --target {result['target']} ({st['mode']} mode): {what}, same model, "
             "same runtime (x = fp32 / ternary, > 1: ternary smaller / faster)", ""]
    lines += table_lines(SIZE_COLUMNS, rows) + [""]
    lines += table_lines(LATENCY_COLUMNS, latency_records(rows))
    if result["scaling"]:
        lines += [""] + table_lines(SCALING_COLUMNS, result["scaling"])
    if profiled := profile_records(rows):
        lines += [""] + table_lines(PROFILE_COLUMNS, profiled)
    if result.get("kernels"):
        lines += [""] + table_lines(KERNEL_COLUMNS, result["kernels"]["times"])
        lines += [""] + table_lines(BOUND_COLUMNS, result["kernels"]["bandwidth_bound"])
    lines.append("")
    shapes = dict.fromkeys((r["config"], r["hidden"], r["expert_intermediate"], r["shared_intermediate"], r["layers"],
                            r["heads"], r["kv_heads"], r["vocab"], r["top_k"]) for r in rows)
    lines += [f"model {c}: hidden {d}, expert intermediate {ie}, shared intermediate {i}, {n} layers, {h} heads "
              f"({kv} kv), vocab {v}, top-{k}" for c, d, ie, i, n, h, kv, v, k in shapes]
    versions = ", ".join(f"{k} {v}" for k, v in st["versions"].items())
    before, after = st["load_average_1min"]
    lines.append(f"{versions}; {st['machine']}, {st['cpus']} CPUs; threads {', '.join(map(str, st['threads']))}; "
                 f"wall time {st['wall_s']} s; 1-min load average {before} before, {after} after")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- command line

def parse_args(argv):
    from mote.targets import REGISTRY, get_target

    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    ap.add_argument("--target", required=True, choices=sorted(REGISTRY))
    ap.add_argument("--quick", action="store_true", help="the smoke test's setting: tiny models, few repeats "
                                                         "(numbers meaningless)")
    ap.add_argument("--profile", action="store_true",
                    help="also run the runtime's profiler over decode steps and print the top operators")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--quantize", metavar="SPEC", default=None,
                    help="quantize the ternary variant's full-precision parts as mote-export --quantize SPEC does "
                         "(the fp32 baseline stays float32)")
    ap.add_argument("--threads", type=int, nargs="+", default=list(DEFAULT_THREADS),
                    help="CPU thread counts to time, one after the other (default: 1 2)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="where the artifacts are lowered (a temporary folder in it, removed at the end; "
                         "default: the system's temporary directory)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the toolchains' own output")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--target", choices=sorted(REGISTRY))
    known, _ = pre.parse_known_args(argv)
    if known.target is not None:   # the target's own flags (mote-export's), on top of its benchmark options
        get_target(known.target).Options.add_arguments(ap, known.target)
    args = ap.parse_args(argv)
    options_class = get_target(args.target).Options
    args.target_options = dataclasses.replace(
        options_class.for_benchmark(), **{f.name: getattr(args, f.name) for f in options_class.cli_fields()
                                          if getattr(args, f.name) != f.default})
    if min(args.threads) < 1:
        ap.error("--threads: counts of 1 or more")
    if args.quantize is not None:
        from mote.export.errors import InputError
        from mote.export.quantization import parse
        try:
            parse(args.quantize)
        except InputError as e:
            ap.error(str(e))
    return args


def main(argv=None) -> int:
    from mote.tools.console import captured_toolchain_output

    args = parse_args(argv)
    with captured_toolchain_output(enabled=not args.verbose) as capture:
        def log(msg: str) -> None:
            print(f"{PROG}: {msg}", file=capture.stderr, flush=True)

        try:
            result = run_benchmark(args.target, "quick" if args.quick else "default", tuple(args.threads),
                                   work_dir=args.work_dir, log=log, profile=args.profile, quantize=args.quantize,
                                   options=args.target_options)
            error = None
        except Exception as e:   # one line, the toolchains' output saved aside (-v: the traceback)
            if args.verbose:
                raise
            error = e
    if error is not None:
        saved = capture.save(PROG)
        print(f"{PROG}: error: {type(error).__name__}: {error}" + (f" (toolchain output: {saved})" if saved else ""),
              file=sys.stderr)
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
