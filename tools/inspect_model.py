"""`mote-inspect MODEL_DIR`: op histogram and weight storage of the traced programs before and after the passes.

Shows, per program, which ops the pass pipeline rewrote and what the weights cost: bytes by dtype and the bits per
routed-expert weight (packed trits + scales: about 2; the loader packs routed experts as it reads them, so a model
directory's programs hold them packed before the passes too).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mote.export.errors import MoteError

ROUTED_MARKERS = (".experts.",)


def storage(ep, routed_weights: int) -> dict:
    by_dtype, routed_bytes = Counter(), 0
    for name, t in list(ep.state_dict.items()) + list(ep.constants.items()):
        if name.startswith(("k_cache_", "v_cache_")):   # runtime state, not weights
            continue
        n = t.numel() * t.element_size()
        by_dtype[str(t.dtype).replace("torch.", "")] += n
        if any(m in name for m in ROUTED_MARKERS):
            routed_bytes += n
    return {"bytes_by_dtype": dict(sorted(by_dtype.items())), "routed_expert_bytes": routed_bytes,
            "routed_expert_bits_per_weight": round(routed_bytes * 8 / routed_weights, 4) if routed_weights else None}


def inspect(model_dir: Path, max_seq_len: int = 32) -> dict:
    from mote.export.loader import load_model
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline
    from mote.passes.program import op_histogram

    model = load_model(model_dir)
    cfg = model.config
    routed = len(cfg.moe.moe_layers) * cfg.moe.num_experts * 3 * cfg.hidden_size * cfg.moe.expert_intermediate_size
    programs = export_programs(model, min(max_seq_len, cfg.max_position_embeddings), KVCacheStyle.IO)
    report = {}
    before = {name: (dict(op_histogram(ep)), storage(ep, routed if name == "text_decoder" else 0))
              for name, ep in programs.items()}
    programs, log = run_pipeline(programs, cfg.moe.moe_layers)
    for name, ep in programs.items():
        report[name] = {
            "before": {"ops": before[name][0], "storage": before[name][1]},
            "after": {"ops": dict(op_histogram(ep)), "storage": storage(ep, routed if name == "text_decoder" else 0)},
            "rewrites": log[name]["rewrites"],
            "max_abs_diff": log[name]["max_abs_diff"],
        }
    return report


def format_report(report: dict) -> str:
    lines = []
    for name, r in report.items():
        lines.append(f"== {name}  (rewrites: {', '.join(f'{k}={v}' for k, v in r['rewrites'].items())}; "
                     f"max abs diff after passes {r['max_abs_diff']:.1e})")
        b, a = r["before"]["ops"], r["after"]["ops"]
        lines.append(f"   {'op':32s} {'before':>7s} {'after':>7s}")
        for op in sorted(set(b) | set(a), key=lambda o: (-(a.get(o, 0) + b.get(o, 0)), o)):
            mark = "  <-" if b.get(op, 0) != a.get(op, 0) else ""
            lines.append(f"   {op:32s} {b.get(op, 0):7d} {a.get(op, 0):7d}{mark}")
        for when in ("before", "after"):
            s = r[when]["storage"]
            dt = ", ".join(f"{k} {v / 1e6:.3f} MB" for k, v in s["bytes_by_dtype"].items())
            bits = s["routed_expert_bits_per_weight"]
            lines.append(f"   weights {when:6s}: {dt}" + (f"; routed experts {bits:.3f} bits/weight" if bits else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mote-inspect", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    try:
        report = inspect(args.model_dir)
    except MoteError as e:
        print(f"mote-inspect: error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
