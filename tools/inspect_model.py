"""`mote-inspect MODEL_DIR`: op histogram and weight storage of the traced programs before and after the passes.

Shows, per program, which ops the pass pipeline rewrote and what the weights cost: bytes by dtype and the bits per
routed-expert weight (packed trits + scales: about 2; the loader packs routed experts as it reads them, so a model
directory's programs hold them packed before the passes too).

`mote-inspect --plan [--quantize SPEC] [--max-seq-len N] (MODEL_DIR | --shape 0.5b|1.5b|3b)`: the memory plan by
part from the config alone (`export.memory_plan`: no weight is read), fp16 vs as exported; with --shape, for the
paper's Qwen2.5-shaped MoTEs (`tools.scale_bench.qwen25_config`), beside the paper's memory figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from mote.export.errors import InputError, MoteError

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


SHAPES = ("0.5b", "1.5b", "3b")
PAPER_SHAPE = "3b"      # the shape of the paper's memory figures (Qwen2.5-3B)


def plan_report(model_dir: Path | None, shape: str | None, quantize: str | None, max_seq_len: int | None) -> dict:
    """The memory plan of MODEL_DIR's config (or of a paper shape) as a JSON-able dict; refusals are InputErrors."""
    from mote.export.config import load_config, parse_config
    from mote.export.memory_plan import PAPER, paper_framing, plan
    from mote.export.quantization import parse

    spec = parse(quantize) if quantize is not None else None
    if shape is not None:
        from mote.tools.scale_bench import qwen25_config
        where = f"Qwen2.5-{shape.upper()}-shaped MoTE"
        cfg = parse_config(qwen25_config(shape), where)
    else:
        if not model_dir.is_dir():
            raise InputError(f"{model_dir}: not a directory")
        where, cfg = str(model_dir), load_config(model_dir)
    p = plan(cfg, spec, max_seq_len, where)
    report = {"model": where, "routed_experts": cfg.moe.num_experts,
              "routed_scales": "per_channel" if cfg.moe.per_channel_scale else "per_tensor",
              "tied_embeddings": cfg.tie_word_embeddings, **p.as_dict()}
    if shape is not None:
        paper = {"dense_fp16": PAPER["dense_gb"], "moe_llava_fp16": PAPER["moe_llava_gb"]}
        report["paper_framing"] = {**paper_framing(cfg, p), "paper_gb": paper if shape == PAPER_SHAPE else None}
    return report


def _unit(n_bytes: int) -> tuple[str, int]:
    return ("GiB", 2**30) if n_bytes >= 2**30 else ("MiB", 2**20)


def format_plan(r: dict) -> str:
    from mote.export.memory_plan import LABELS

    unit, div = _unit(r["weights"]["fp16"])
    q = r["quantize"]
    lines = [f"memory plan of {r['model']} (from its config alone: no weight read)",
             "  fp16: every weight 2 bytes.  exported: routed experts as 2-bit codes + fp32 scales "
             f"({r['routed_scales'].replace('_', ' ')}), the rest fp32",
             *([f"  --quantize {q['spec']}: {_spec_text(q)}"] if q else []),
             f"  {'part':40s} {'fp16 ' + unit:>10s} {'exported ' + unit:>14s} {'exported/fp16':>14s}"]

    def row(label, fp16, exported):
        ratio = f"{exported / fp16:.2f}x" if fp16 else "-"
        lines.append(f"  {label:40s} {fp16 / div:10.2f} {exported / div:14.2f} {ratio:>14s}")

    for part, b in r["parts"].items():
        label = LABELS[part]
        if part == "lm_head" and r["tied_embeddings"]:
            label += " (tied" + ("; own quantized copy)" if b["exported_bytes"] else ")")
        row(label, b["fp16_bytes"], b["exported_bytes"])
    w, ne, kv = r["weights"], r["non_embedding_weights"], r["kv_cache"]
    row("weights", w["fp16"], w["exported"])
    row("non-embedding weights", ne["fp16"], ne["exported"])
    row(f"KV cache, {r['max_seq_len']} positions (fp16 | fp32)", kv["fp16_bytes"], kv["exported_bytes"])
    row("weights + KV cache", w["fp16"] + kv["fp16_bytes"], w["exported"] + kv["exported_bytes"])
    if "paper_framing" in r:
        lines += format_framing(r["paper_framing"], r["model"], q is not None)
    return "\n".join(lines)


def _spec_text(q: dict) -> str:
    """`QuantSpec.as_dict()` in words: the quantized parts, then each used width's group along K."""
    used = sorted({v for v in q["parts"].values() if v})
    groups = q["group"] if isinstance(q["group"], dict) else dict.fromkeys(used, q["group"])
    words = lambda g: "per output channel" if g == "channel" else f"in groups of {g}"   # noqa: E731
    return (", ".join(f"{k}={v}" for k, v in q["parts"].items() if v) + "; "
            + ", ".join(f"{b} {words(groups[b])}" for b in used) + "; the rest fp32")


def format_framing(f: dict, model: str, quantized: bool) -> list[str]:
    gib = lambda b: f"{b / 2**30:.2f}"     # noqa: E731
    paper = f["paper_gb"] or {}
    e = f["mote_routed_experts"]
    exported = "routed 2-bit, " + ("the rest per --quantize" if quantized else "the rest fp32")
    lines = ["", f"paper framing ({model}, non-embedding weights; GiB = 2^30 bytes, the paper's \"GB\"):",
             f"  {'model':62s} {'ours GiB':>9s} {'paper GB':>9s}"]
    for label, key in (("dense backbone, fp16", "dense_fp16"),
                       (f"MoE-LLaVA: {f['moe_llava_experts']} fp16 experts replace each FFN", "moe_llava_fp16"),
                       (f"this MoTE (FFN as shared expert + {e} routed), fp16", "mote_fp16"),
                       (f"this MoTE as exported ({exported})", "mote_exported")):
        lines.append(f"  {label:62s} {gib(f[key]):>9s} {paper.get(key, '-'):>9}")
    lines.append(f"  difference: MoE-LLaVA holds {f['moe_llava_experts']} FFN-sized fp16 experts in each of "
                 f"{f['layers']} layers; this MoTE keeps the FFN as its shared expert and adds {e} routed ones of "
                 f"the same size ({e + 1} per layer: {gib(f['mote_fp16'])} GiB in fp16), whose 2-bit codes take "
                 f"{gib(f['mote_routed_exported'])} GiB instead of {gib(f['mote_routed_fp16'])}: "
                 f"{gib(f['mote_exported'])} GiB as exported, {f['moe_llava_fp16'] / f['mote_exported']:.1f}x less "
                 f"than MoE-LLaVA's {gib(f['moe_llava_fp16'])}")
    return lines


def _check_args(args) -> None:
    if not args.plan and (args.quantize is not None or args.shape is not None):
        raise InputError("--quantize and --shape need --plan (the op inspection reads the model as it is)")
    if args.plan and (args.model_dir is None) == (args.shape is None):
        raise InputError("--plan needs either MODEL_DIR or --shape, not both" if args.shape else
                         "--plan needs MODEL_DIR or --shape (one of: " + ", ".join(SHAPES) + ")")
    if not args.plan and args.model_dir is None:
        raise InputError("MODEL_DIR is missing")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise InputError(f"--max-seq-len {args.max_seq_len}: must be at least 1")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mote-inspect", description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, nargs="?")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--plan", action="store_true",
                    help="the memory plan by part from the config alone (no weight read): fp16 vs as exported")
    ap.add_argument("--quantize", metavar="SPEC",
                    help="with --plan: plan the export with mote-export's --quantize SPEC")
    ap.add_argument("--shape", choices=SHAPES,
                    help="with --plan, instead of MODEL_DIR: a paper shape (Qwen2.5-sized MoTE, 1 shared + 4 routed "
                         "experts per layer), shown beside the paper's memory figures")
    ap.add_argument("--max-seq-len", type=int, default=None,
                    help="KV-cache length (default: --plan min(128, max positions), like mote-export; inspection 32)")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    try:
        _check_args(args)
        if args.plan:
            report = plan_report(args.model_dir, args.shape, args.quantize, args.max_seq_len)
            text = format_plan
        else:
            report = inspect(args.model_dir, args.max_seq_len or 32)
            text = format_report
    except MoteError as e:
        print(f"mote-inspect: error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
