"""Scale benchmark: `mote-export` on real-size MoTE shapes, per target, per stage (DESIGN.md section 10).

    python -m mote.tools.scale_bench [--shape 0.5b|1.5b|3b ...] [--target onnx android ...] [--quantize SPEC]
                                     [--dir D] [--json F]

For each shape, writes the random model once into D/<shape> (tools/scale_check.py's writer: bf16 safetensors,
tensor by tensor; reused when already there), then runs `mote-export --target T` in a fresh process per target
(with verification: 32 greedy tokens) and records, from its report.json and the kernel's accounting of the child:
- wall time and peak RSS per stage (load, reference, trace, passes, lower, verify) and for the whole process;
- artifact bytes by part: routed experts (weights + scales, read back from the artifact) and the rest;
- peak RSS / artifact bytes (the goal is under 3x) and the budget verdict (0.5B: <= 10 min, <= 8 GiB, verified).
Prints a table and writes the JSON. Shapes: Qwen2.5-0.5B (24 layers, hidden 896, experts of 4864),
Qwen2.5-1.5B (28 layers, hidden 1536, experts of 8960) and Qwen2.5-3B (36 layers, hidden 2048, experts of 11008:
12.8 B weights; DESIGN.md section 10 budgets it with `--quantize` at <= 20 GiB), each with 1 shared + 4 routed
top-1 experts per layer. `--quantize SPEC` is passed to every export (and the 3B shape needs it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mote.tools.make_random_model import random_config
from mote.tools.scale_check import write_model

STAGES = ("load", "reference", "trace", "passes", "lower", "verify")
STAGES = ("fp32_reference", *STAGES, "quantization_effect")   # the first and last only with --quantize
BUDGET = {"0.5b": {"wall_s": 600, "peak_rss_gib": 8.0}, "3b": {"wall_s": None, "peak_rss_gib": 20.0}}


def qwen25_config(shape: str) -> dict:
    dims = {"0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, expert_intermediate=4864),
            "1.5b": dict(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, expert_intermediate=8960),
            "3b": dict(hidden=2048, layers=36, heads=16, kv_heads=2, intermediate=11008,
                       expert_intermediate=11008)}[shape]
    cfg = random_config(**dims, vocab=151936, experts=4, top_k=1, moe_layers="all", vision=False, max_positions=32768)
    cfg["rope_theta"] = 1_000_000.0
    return cfg


def ensure_model(model_dir: Path, shape: str) -> None:
    cfg = qwen25_config(shape)
    if (model_dir / "config.json").is_file() and json.loads((model_dir / "config.json").read_text()) == cfg:
        return
    if model_dir.exists() and any(model_dir.iterdir()):
        raise SystemExit(f"scale_bench: {model_dir} holds something else; give another --dir")
    print(f"scale_bench: writing the Qwen2.5-{shape.upper()}-shaped MoTE to {model_dir} ...", flush=True)
    facts = write_model(model_dir, cfg)
    print(f"scale_bench: {facts['parameters'] / 1e9:.2f} B weights, {facts['bytes_on_disk'] / 2**30:.2f} GiB bf16",
          flush=True)


def run_export(model_dir: Path, target: str, out: Path, max_seq_len: int, quantize: str | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "mote.tools.cli", "--target", target, str(model_dir), "-o", str(out),
           "--max-seq-len", str(max_seq_len), *(["--quantize", quantize] if quantize else [])]
    # The child's output goes to files beside the output, not pipes: wait4 (for the child's peak RSS) must not
    # block on a full pipe.
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as out_f, open(log.with_suffix(".err"), "w") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    stdout, stderr = log.read_text(), log.with_suffix(".err").read_text()
    code = os.waitstatus_to_exitcode(status)
    row = {"target": target, "exit_code": code, "wall_s": round(wall, 1),
           "process_peak_rss_bytes": usage.ru_maxrss * 1024}
    report_path = out / "report.json"
    if code != 0 or not report_path.is_file():
        row["error"] = (stderr.strip().splitlines() or stdout.strip().splitlines() or ["(no output)"])[-1]
        return row
    report = json.loads(report_path.read_text())
    total = sum(a["bytes"] for a in report["artifacts"])
    # mote-export resets the kernel's RSS high-water mark at each stage (/proc/self/clear_refs), and wait4 reports
    # that same mark: it is the last stage's peak. The process's peak is the largest stage peak.
    stage_peaks = [report["peak_rss_bytes"].get(s) or 0 for s in STAGES]
    row["process_peak_rss_bytes"] = max(row["process_peak_rss_bytes"], *stage_peaks)
    row.update({
        "stages_s": {s: report["timings_s"].get(s) for s in STAGES},
        "stages_peak_rss_bytes": {s: report["peak_rss_bytes"].get(s) for s in STAGES},
        "child_processes_peak_rss_bytes": report["peak_rss_bytes"].get("child_processes"),
        "artifacts": report["artifacts"],
        "artifact_bytes": total,
        "routed_expert_bytes": report["routed_expert_bytes"],
        "other_bytes": total - report["routed_expert_bytes"],
        "routed_expert_bits_per_weight": report["routed_expert_bits_per_weight"],
        "verify": report["verify"],
        "greedy": report["numerics"].get("text_decoder", {}).get("greedy_match"),
        "sqnr_db": report["numerics"].get("text_decoder", {}).get("sqnr_db"),
        "reference_noise_floor_db": report["numerics"].get("text_decoder", {}).get("reference_noise_floor_db"),
        "peak_rss_over_artifact": round(row["process_peak_rss_bytes"] / total, 2),
    })
    return row


def verdict(shape: str, row: dict) -> str:
    budget = BUDGET.get(shape)
    if row["exit_code"] != 0:
        return "FAILED"
    if budget is None:
        return "no budget"
    ok = ((budget["wall_s"] is None or row["wall_s"] <= budget["wall_s"]) and row["process_peak_rss_bytes"] <= budget["peak_rss_gib"] * 2**30
          and row["verify"] == "passed" and row["greedy"] == "32/32")
    return "within budget" if ok else "OVER BUDGET"


def table(results: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"   # noqa: E731
    head = ("| shape | target | wall | " + " | ".join(STAGES) + " | peak RSS GiB (stage peaks: " + ", ".join(STAGES)
            + ") | artifact GiB (experts + rest) | peak / artifact | verify | decoder SQNR dB (reference floor) | greedy "
            "| budget |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        if r["exit_code"] != 0:
            lines.append(f"| {r['shape']} | {r['target']} | {r['wall_s']:.0f} s | " + " | ".join("-" for _ in STAGES)
                         + f" | {gib(r['process_peak_rss_bytes'])} | - | - | exit {r['exit_code']}: {r['error']} | - | "
                         f"{r['verdict']} |")
            continue
        stages = " | ".join(f"{r['stages_s'][s]:.0f} s" if r['stages_s'][s] is not None else "-" for s in STAGES)
        peaks = ", ".join(gib(r["stages_peak_rss_bytes"][s]) for s in STAGES)
        lines.append(f"| {r['shape']} | {r['target']} | {r['wall_s']:.0f} s | {stages} | "
                     f"{gib(r['process_peak_rss_bytes'])} ({peaks}) | {gib(r['artifact_bytes'])} "
                     f"({gib(r['routed_expert_bytes'])} + {gib(r['other_bytes'])}) | {r['peak_rss_over_artifact']:.2f}x | "
                     f"{r['verify']} | {r['sqnr_db']} ({r.get('reference_noise_floor_db', '-')}) | {r['greedy']} | "
                     f"{r['verdict']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["0.5b", "1.5b"], choices=["0.5b", "1.5b", "3b"])
    ap.add_argument("--target", nargs="+", default=["onnx", "android"])
    ap.add_argument("--quantize", default=None, help="a mote-export --quantize spec for every export (e.g. int4)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mote-scale"), help="models and outputs (kept)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    results = []
    for shape in a.shape:
        model_dir = a.dir / f"qwen2.5-{shape}-mote"
        ensure_model(model_dir, shape)
        for target in a.target:
            print(f"scale_bench: {shape} -> {target} ...", flush=True)
            suffix = f"-{a.quantize.replace(',', '_').replace('=', '')}" if a.quantize else ""
            row = {"shape": shape, "quantize": a.quantize,
                   **run_export(model_dir, target, a.dir / f"out-{shape}-{target}{suffix}", a.max_seq_len, a.quantize)}
            row["verdict"] = verdict(shape, row)
            results.append(row)
            print(f"scale_bench: {shape} {target}: exit {row['exit_code']}, {row['wall_s']:.0f} s, peak "
                  f"{row['process_peak_rss_bytes'] / 2**30:.2f} GiB, {row['verdict']}", flush=True)
    print(table(results))
    out = json.dumps({"max_seq_len": a.max_seq_len, "quantize": a.quantize, "results": results}, indent=1)
    print(out)
    if a.json:
        a.json.write_text(out + "\n")
    return 0 if all(r["verdict"] != "FAILED" and r["verdict"] != "OVER BUDGET" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
