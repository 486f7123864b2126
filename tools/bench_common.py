"""What the target benchmarks (bench_onnx, bench_executorch) share: ternary vs fp32 experts of the same model.

Each benchmark lowers random text-only MoTE models (`ModelShape`) at one or more routed-expert counts, in two
variants (`VARIANTS`), loads each artifact's text decoder into its runtime and times them all together
(`time_interleaved`). This module holds the parts that do not depend on the target: the model and timing settings,
the round-robin timing, the fp32-over-ternary and expert-count ratios, the text-table layout and the command line.
Lowering, the runtime-specific decoder, counting storage in the artifact and the notes stay in each benchmark.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

# "qmoe" is the deployable ternary export; "fp32" the benchmark-only baseline with the same experts dequantized
VARIANTS = ("qmoe", "fp32")


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


def time_interleaved(decoders: dict, mode: Mode, *, with_min_and_count: bool = True) -> dict:
    """Prefill and decode-step latencies (ms: median, and unless told otherwise min and sample count) per decoder.

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
        median = {f"{what}_ms": 1e3 * statistics.median(samples)}
        if not with_min_and_count:
            return median
        return {**median, f"{what}_min_ms": 1e3 * min(samples), f"{what}_samples": len(samples)}

    return {k: {**stats(prefill[k], "prefill"), **stats(decode[k], "decode")} for k in decoders}


def add_timings_and_ratios(rows: list[dict], times: dict, size_key: str) -> None:
    """Put each variant's latencies (`times` keyed by (experts, variant)) in its row, then the fp32 / ternary ratios.

    `size_key` names the artifact size in bytes both variants of a row carry (it differs per target).
    """
    for row in rows:
        for variant in VARIANTS:
            row[variant].update(times[(row["experts"], variant)])
        t, f = row["qmoe"], row["fp32"]
        row["bits_ratio_fp32_over_ternary"] = f["bits_per_weight"] / t["bits_per_weight"]
        row["bytes_ratio_fp32_over_ternary"] = f[size_key] / t[size_key]
        row["prefill_ratio_fp32_over_ternary"] = f["prefill_ms"] / t["prefill_ms"]
        row["decode_ratio_fp32_over_ternary"] = f["decode_ms"] / t["decode_ms"]


def expert_scaling_rows(rows: list[dict], size_key: str) -> list[dict]:
    """Per configuration benchmarked at several expert counts: the largest E against the smallest.

    The size ratio's key is `size_key` + "_ratio" (e.g. onnx_bytes_ratio), so each target's JSON names its artifact.
    """
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
                        f"{size_key}_ratio": big[variant][size_key] / r[variant][size_key]})
    return out


class RunClock:
    """Wall time and 1-minute load average of a benchmark run: other processes on the machine disturb timings."""

    def __init__(self):
        self.start = time.perf_counter()
        self.load_before = os.getloadavg()

    def settings(self) -> dict:
        """`wall_s` and `load_average_1min` [before, after] for the result's settings; call when the run is done."""
        return {"wall_s": round(time.perf_counter() - self.start, 1),
                "load_average_1min": [round(self.load_before[0], 2), round(os.getloadavg()[0], 2)]}


def describe_run(settings: dict) -> str:
    """The table's account of `RunClock.settings()`."""
    before, after = settings["load_average_1min"]
    return f"benchmark wall time {settings['wall_s']} s; 1-min load average {before} before, {after} after"


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


def table_lines(columns: list[Column], records: list[dict], underline: bool) -> list[str]:
    header = " ".join(c.pad(c.header) for c in columns)
    lines = [header] + (["-" * len(header)] if underline else [])
    lines += [" ".join(c.pad(format(c.value(r), c.fmt)) for c in columns) for r in records]
    return lines


def variant_comparison_columns(size_key: str) -> list[Column]:
    """Ternary vs fp32 columns of a result row (after the target's naming columns); MB is the artifact `size_key`."""
    def ratio(header: str, width: int, key: str) -> Column:
        return Column(header, width, lambda r: r[f"{key}_ratio_fp32_over_ternary"], ".2f")

    return [Column("bits/w tern", 11, lambda r: r["qmoe"]["bits_per_weight"], ".4f"),
            Column("bits/w fp32", 11, lambda r: r["fp32"]["bits_per_weight"], ".2f"),
            ratio("bits x", 6, "bits"),
            Column("MB tern", 8, lambda r: r["qmoe"][size_key] / 1e6, ".2f"),
            Column("MB fp32", 8, lambda r: r["fp32"][size_key] / 1e6, ".2f"),
            ratio("bytes x", 7, "bytes"),
            SEPARATOR,
            Column("prefill ms tern", 15, lambda r: r["qmoe"]["prefill_ms"], ".3f"),
            Column("fp32", 8, lambda r: r["fp32"]["prefill_ms"], ".3f"),
            ratio("x", 5, "prefill"),
            SEPARATOR,
            Column("decode ms tern", 14, lambda r: r["qmoe"]["decode_ms"], ".3f"),
            Column("fp32", 7, lambda r: r["fp32"]["decode_ms"], ".3f"),
            ratio("x", 5, "decode")]


# expert-count scaling rows (`expert_scaling_rows`); a target may append columns
SCALING_COLUMNS = [
    Column("expert-count scaling (top-1)", 30, lambda s: s["config"], left=True),
    Column("variant", 8, lambda s: "ternary" if s["variant"] == "qmoe" else "fp32", left=True),
    Column("E -> 4E", 8, lambda s: f"{s['experts']} -> {s['experts_scaled']}"),
    Column("decode ms E", 11, lambda s: s["decode_ms"], ".3f"),
    Column("4E", 8, lambda s: s["decode_ms_scaled"], ".3f"),
    Column("4E/E", 6, lambda s: s["decode_ratio"], ".2f"),
    SEPARATOR,
    Column("prefill ms E", 12, lambda s: s["prefill_ms"], ".3f"),
    Column("4E", 8, lambda s: s["prefill_ms_scaled"], ".3f"),
    Column("4E/E", 6, lambda s: s["prefill_ratio"], ".2f"),
]


def format_result(result: dict, row_columns: list[Column], legend: str, scaling_columns: list[Column],
                  environment: list[str]) -> str:
    """The rows' table and its legend, the scaling table (if any), the `environment` lines, then the notes."""
    lines = table_lines(row_columns, result["rows"], underline=True) + [legend]
    if result["scaling"]:
        lines += [""] + table_lines(scaling_columns, result["scaling"], underline=False)
    lines += [""] + environment
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def run_cli(argv, doc: str, run_benchmark, format_table, quick_help: str, threads_help: str) -> int:
    """The benchmarks' command line: progress on stderr, the table on stdout, optionally the result as JSON."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--threads", type=int, default=1, help=threads_help)
    a = ap.parse_args(argv)
    result = run_benchmark("quick" if a.quick else "default", a.threads,
                           log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0
