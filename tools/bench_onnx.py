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

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FP32_ROUTING_NOTE = ("the fp32 baseline (com.microsoft.MoE, no router_weights input) weighs the top-1 expert by 1.0 "
                     "instead of its router probability; that changes its output, not its cost")


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


@dataclasses.dataclass(frozen=True)
class Mode:
    shapes: tuple[ModelShape, ...]
    max_seq_len: int = 128
    prefill_len: int = 64
    prefill_warmup: int = 2
    prefill_repeats: int = 10        # at least; more until each session spent min_seconds (or max_prefill_repeats)
    decode_warmup: int = 5
    decode_steps: int = 50           # per round (prefill, then steps); more rounds until min_seconds
    min_seconds: float = 1.0
    max_prefill_repeats: int = 200
    max_decode_rounds: int = 10


MODES = {
    # ~3 min on 2 cores (4.3 GB peak RSS), mostly exporting the realistic-width models (the 4E fp32 one: 0.7 GB)
    "default": Mode(shapes=(
        ModelShape("tiny (d=128)", hidden=128, expert_intermediate=256, intermediate=256),
        ModelShape("realistic (d=1024)", hidden=1024, expert_intermediate=1536, intermediate=2816, heads=8, vocab=1024),
    )),
    "quick": Mode(shapes=(
        ModelShape("tiny (d=128)", hidden=128, expert_intermediate=256, intermediate=256, layers=1, experts=(4,)),
        ModelShape("wide (d=512)", hidden=512, expert_intermediate=512, intermediate=1024, layers=1, vocab=512),
    ), prefill_repeats=5, decode_steps=30, min_seconds=0.3),
    # the smoke test: seconds, numbers meaningless
    "smoke": Mode(shapes=(
        ModelShape("smoke (d=64)", hidden=64, expert_intermediate=64, intermediate=128, layers=1, vocab=256,
                   experts=(2, 8)),
    ), max_seq_len=32, prefill_len=8, prefill_warmup=1, prefill_repeats=2, decode_warmup=1, decode_steps=3,
                   min_seconds=0.0),
}
VARIANTS = ("qmoe", "fp32")


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
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline

    # lower() rewrites the programs in place, so each variant exports its own (deterministic) copy
    programs = export_programs(model, max_seq_len, KVCacheStyle.IO)
    programs, _ = run_pipeline({"text_decoder": programs["text_decoder"]}, verify=False)
    return onnx_target.TARGET.lower(programs, model, out_dir,
                                    {"experts": variant, "max_seq_len": max_seq_len, "ort": False})


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

    def start_decode(self, prefill_len: int) -> None:
        _, outs = self._run(self._embeds(prefill_len), 0, self.empty)
        self.cache = {p.name: outs[p.name.replace("past_", "present_")] for p in self.past}
        self.pos = prefill_len

    def decode_step(self) -> float:
        dt, outs = self._run(self._embeds(1), self.pos, self.cache)
        self.cache = {p.name: outs[p.name.replace("past_", "present_")] for p in self.past}
        self.pos += 1
        return dt


def time_interleaved(decoders: dict, mode: Mode) -> dict:
    """Prefill and decode-step latencies (ms: median, min, samples) per session, the sessions timed round-robin.

    Prefill: at least `prefill_repeats` samples, more (up to `max_prefill_repeats`) until every session has spent
    `min_seconds`. Decode: rounds of a prefill then `decode_warmup` untimed + `decode_steps` timed steps (the positions
    must stay inside the static cache), at least one round, more (up to `max_decode_rounds`) likewise.
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
    for rnd in range(mode.max_decode_rounds):
        for d in decoders.values():
            d.start_decode(mode.prefill_len)
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
    times = time_interleaved(decoders, mode)
    for row in rows:
        for variant in VARIANTS:
            row[variant].update(times[(row["experts"], variant)])
        t, f = row["qmoe"], row["fp32"]
        row["bits_ratio_fp32_over_ternary"] = f["bits_per_weight"] / t["bits_per_weight"]
        row["bytes_ratio_fp32_over_ternary"] = f["onnx_bytes"] / t["onnx_bytes"]
        row["prefill_ratio_fp32_over_ternary"] = f["prefill_ms"] / t["prefill_ms"]
        row["decode_ratio_fp32_over_ternary"] = f["decode_ms"] / t["decode_ms"]
    return rows


def scaling_rows(rows: list[dict]) -> list[dict]:
    """Per configuration benchmarked at several expert counts: the largest E against the smallest."""
    out = []
    for config in dict.fromkeys(r["config"] for r in rows):
        mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["experts"])
        if len(mine) < 2:
            continue
        r, big = mine[0], mine[-1]
        for variant in VARIANTS:
            out.append({"config": r["config"], "variant": variant, "experts": r["experts"],
                        "experts_scaled": big["experts"], "top_k": r["top_k"],
                        "decode_ms": r[variant]["decode_ms"], "decode_ms_scaled": big[variant]["decode_ms"],
                        "decode_ratio": big[variant]["decode_ms"] / r[variant]["decode_ms"],
                        "prefill_ms": r[variant]["prefill_ms"], "prefill_ms_scaled": big[variant]["prefill_ms"],
                        "prefill_ratio": big[variant]["prefill_ms"] / r[variant]["prefill_ms"],
                        "onnx_bytes_ratio": big[variant]["onnx_bytes"] / r[variant]["onnx_bytes"]})
    return out


def run_benchmark(mode: str = "default", threads: int = 1, work_dir: Path | None = None, log=None) -> dict:
    """The whole benchmark; returns a JSON-able dict with `settings`, `rows`, `scaling` and `notes`."""
    import onnxruntime as ort

    log = log or (lambda msg: None)
    m = MODES[mode]
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="mote-bench-", dir=work_dir) as work:
        for shape in m.shapes:
            rows += bench_shape(shape, m, threads, Path(work), log)
    settings = {"mode": mode, "threads": {"intra_op": threads, "inter_op": 1, "execution": "sequential"},
                "onnxruntime": ort.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                "max_seq_len": m.max_seq_len, "prefill_len": m.prefill_len, "prefill_repeats_min": m.prefill_repeats,
                "decode_warmup": m.decode_warmup, "decode_steps_per_round": m.decode_steps,
                "min_seconds_per_session": m.min_seconds,
                "decode_positions": [m.prefill_len, m.prefill_len + m.decode_warmup + m.decode_steps - 1],
                "wall_s": round(time.perf_counter() - t0, 1),
                # other processes on the machine disturb timings: the 1-minute load average before and after
                "load_average_1min": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    notes = [
        FP32_ROUTING_NOTE,
        "fp32 experts = the ternary experts dequantized (same model, same routing); both variants run the same "
        "attention, fp32 shared expert, router and lm head, so latencies are of the whole text_decoder",
        "com.microsoft.QMoE's block-wise 2-bit kernel quantizes the expert activations itself (a declared deviation)",
        "bits/weight = routed-expert weight + scale bytes in text_decoder.onnx x 8 / routed-expert weights; "
        "2 + 32/block for the ternary export (block = largest of 32..512 dividing K and the expert width)",
        f"latency: median (JSON also has min and sample counts); prefill = {m.prefill_len} tokens from input_pos 0, "
        f">= {m.prefill_repeats} runs; decode = one token per step at positions {m.prefill_len}.."
        f"{m.prefill_len + m.decode_warmup + m.decode_steps - 1} after a prefill (first {m.decode_warmup} steps of "
        f"each round not timed), rounds repeated until >= {m.min_seconds} s per session; static KV cache of "
        f"{m.max_seq_len}; CPU EP, {threads} intra-op thread(s); sessions timed round-robin",
    ]
    return {"settings": settings, "rows": rows, "scaling": scaling_rows(rows), "notes": notes}


def format_table(result: dict) -> str:
    hdr = (f"{'config':<20} {'E':>3} {'blk':>4} {'bits/w tern':>11} {'bits/w fp32':>11} {'bits x':>6} "
           f"{'MB tern':>8} {'MB fp32':>8} {'bytes x':>7} | {'prefill ms tern':>15} {'fp32':>8} {'x':>5} | "
           f"{'decode ms tern':>14} {'fp32':>7} {'x':>5}")
    lines = [hdr, "-" * len(hdr)]
    for r in result["rows"]:
        t, f = r["qmoe"], r["fp32"]
        blk = ",".join(str(b) for b in t.get("blocks", [])) or "-"
        lines.append(
            f"{r['config']:<20} {r['experts']:>3} {blk:>4} {t['bits_per_weight']:>11.4f} {f['bits_per_weight']:>11.2f} "
            f"{r['bits_ratio_fp32_over_ternary']:>6.2f} {t['onnx_bytes'] / 1e6:>8.2f} {f['onnx_bytes'] / 1e6:>8.2f} "
            f"{r['bytes_ratio_fp32_over_ternary']:>7.2f} | "
            f"{t['prefill_ms']:>15.3f} {f['prefill_ms']:>8.3f} {r['prefill_ratio_fp32_over_ternary']:>5.2f} | "
            f"{t['decode_ms']:>14.3f} {f['decode_ms']:>7.3f} {r['decode_ratio_fp32_over_ternary']:>5.2f}")
    lines.append("(x = fp32 / ternary; bits = routed-expert storage per weight; MB = text_decoder.onnx; "
                 "blk = QMoE scale block)")
    if result["scaling"]:
        lines += ["", f"{'expert-count scaling (top-1)':<30} {'variant':<8} {'E -> 4E':>8} "
                      f"{'decode ms E':>11} {'4E':>8} {'4E/E':>6} | {'prefill ms E':>12} {'4E':>8} {'4E/E':>6}"]
        for s in result["scaling"]:
            lines.append(f"{s['config']:<30} {('ternary' if s['variant'] == 'qmoe' else 'fp32'):<8} "
                         f"{str(s['experts']) + ' -> ' + str(s['experts_scaled']):>8} {s['decode_ms']:>11.3f} "
                         f"{s['decode_ms_scaled']:>8.3f} {s['decode_ratio']:>6.2f} | {s['prefill_ms']:>12.3f} "
                         f"{s['prefill_ms_scaled']:>8.3f} {s['prefill_ratio']:>6.2f}")
    st = result["settings"]
    lines += ["", f"onnxruntime {st['onnxruntime']}, {st['machine']}, {st['cpus']} CPUs, intra-op threads "
                  f"{st['threads']['intra_op']}, inter-op 1, sequential; benchmark wall time {st['wall_s']} s; "
                  f"1-min load average {st['load_average_1min'][0]} before, {st['load_average_1min'][1]} after"]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models and fewer repeats (under a minute)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    a = ap.parse_args(argv)
    result = run_benchmark("quick" if a.quick else "default", a.threads,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
