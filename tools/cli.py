"""`mote-export`: trace a MoTE model, rewrite it into ternary `mote::` ops, lower it to a target, verify it.

    mote-export --target {onnx,...} MODEL_DIR [-o OUT_DIR] [--max-seq-len N] [--no-verify]

Exit codes (DESIGN.md section 7): 0 success, 2 bad input or usage, 3 numerics verification failed, 1 anything else.
Output is staged in a hidden sibling folder and moved into place only when everything (including the numerics
check) succeeded, so a failed or interrupted run (Ctrl-C: exit 130) never leaves a half-written or unverified
artifact behind; `-o` never replaces a file or a folder holding files we did not write (tools/output_dir.py).

Memory: the reference runs once, before lowering, and only its outputs are kept; after lowering the programs and
the model are released, so the target's runtime runs the artifact alone (each step's peak RSS is in the report).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

from mote.export.errors import MoteError, VerificationError
from mote.targets import REGISTRY
from mote.export.memory import children_peak_rss_bytes, peak_rss_bytes, release_memory, reset_peak
from mote.tools.output_dir import MARKER, REPORT, OutputDir

DEFAULT_PROMPT = "Describe the image:"


class Progress:
    """Step lines on stdout with their durations (so steps that take seconds are visible), and each step's wall
    time and peak RSS for the report.

    stdout, not stderr: on failure stderr carries exactly one line, the error.
    """

    def __init__(self, quiet: bool):
        self.quiet, self.timings, self.peak_rss = quiet, {}, {}

    @contextlib.contextmanager
    def step(self, name: str, label: str):
        if not self.quiet:
            print(f"mote-export: {label} ...", flush=True)
        release_memory()
        reset_peak()
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss[name] = peak_rss_bytes()
        if not self.quiet:
            print(f"mote-export: {label} done in {self.timings[name]:.1f} s "
                  f"(peak RSS {self.peak_rss[name] / 2**30:.2f} GiB)", flush=True)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="mote-export", description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, choices=sorted(REGISTRY))
    ap.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    ap.add_argument("-o", "--out", type=Path, help="output directory (default: out/<model>-<target>)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="static KV-cache length (default: min(128, max positions))")
    ap.add_argument("--no-verify", action="store_true", help="skip the numerics check against PyTorch")
    ap.add_argument("--prompt", default=None, help="verification prompt (default: MODEL_DIR/prompt.txt or a fixed one)")
    ap.add_argument("--image", type=Path, default=None, help="verification image, PNG (default: MODEL_DIR/sample.png)")
    ap.add_argument("--portable", action="store_true", help="onnx: standard ops only (DequantizeLinear INT2, opset 25)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into an -o folder that holds other files (they are kept; same-named files replaced)")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def verification_inputs(args, model):
    """The prompt (a `Prompt`: token ids, special ids, `source`) + image every program is checked on: the model's
    shipped sample (prompt.txt, sample.png) through its own tokenizer and image preprocessing, else a fixed
    synthetic image and, without a tokenizer, a synthetic token-id prompt (`prompt.source` says which)."""
    import torch

    from mote.export.images import load_pixel_values
    from mote.export.tokenizer import verification_prompt

    text = args.prompt
    if text is None:
        p = args.model_dir / "prompt.txt"
        text = p.read_text().strip() if p.is_file() else DEFAULT_PROMPT
    pixel_values = None
    vc = model.config.vision
    if vc is not None:
        image = args.image or (args.model_dir / "sample.png")
        if image.is_file() or args.image is not None:
            pixel_values = load_pixel_values(image, args.model_dir, model.config)
        else:
            gen = torch.Generator().manual_seed(0)
            pixel_values = torch.rand(1, vc.num_channels, vc.image_size, vc.image_size, generator=gen) * 2 - 1
    return verification_prompt(args.model_dir, model.config, text, pixel_values is not None), pixel_values


def run(args) -> dict:
    from mote.export.generate import EagerRunner
    from mote.export.loader import load_model
    from mote.export.programs import export_programs
    from mote.export.tokenizer import copy_side_files
    from mote.export.verify import passed, record_reference, replay
    from mote.passes.pipeline import run_pipeline
    from mote.targets import get_target

    progress = Progress(args.quiet)
    output = OutputDir(args.out or Path("out") / f"{args.model_dir.resolve().name}-{args.target}", args.overwrite)
    output.check()
    output.remove_stale_staging()
    with progress.step("load", f"loading {args.model_dir}"):
        model = load_model(args.model_dir)
    config = model.config
    target = get_target(args.target)
    max_seq_len = args.max_seq_len or min(128, config.max_position_embeddings)
    prompt, pixel_values = verification_inputs(args, model)
    reference = None
    if not args.no_verify:
        # Once, now: the reference's outputs are kept (a few MB) and the model need not outlive the lowering.
        with progress.step("reference", "running the PyTorch reference on the verification prompt"):
            reference = record_reference(EagerRunner(model, max_seq_len), prompt, pixel_values)
    with progress.step("trace", f"tracing {('vision_encoder, ' if model.vision_tower is not None else '')}"
                                "token_embedding, text_decoder with torch.export"):
        programs = export_programs(model, max_seq_len, target.kv_style)
    with progress.step("passes", "rewriting MoTE blocks into mote:: ternary ops"):
        # Without an end-to-end check, the pipeline checks its own numerics on the programs' sample inputs.
        programs, pass_log = run_pipeline(programs, config.moe.moe_layers, verify=args.no_verify)

    staging = output.create_staging()
    try:
        options = {"experts": "portable" if args.portable else "qmoe", "max_seq_len": max_seq_len,
                   "special_ids": prompt.special}
        with progress.step("lower", f"lowering to {args.target}"):
            lowered = target.lower(programs, model, staging, options)
        # The artifact is on disk: the programs and the model (which share the weights) are not needed any more.
        del programs, model
        release_memory()
        report = {
            "tool": "mote-export",
            "target": args.target,
            "model_dir": str(args.model_dir),
            "max_seq_len": max_seq_len,
            "artifacts": [{"path": p.name, "bytes": p.stat().st_size} for p in lowered.artifacts],
            "routed_expert_bits_per_weight": round(lowered.routed_expert_bits_per_weight, 4),
            "routed_expert_weights": lowered.routed_expert_weights,
            "routed_expert_bytes": lowered.routed_expert_bytes,
            "deviations": lowered.deviations,
            "notes": lowered.notes,
            "facts": lowered.facts,
            "passes": pass_log,
            "model": model_facts(config, prompt),
        }
        if args.no_verify:
            report["verify"] = "skipped"
            report["numerics"] = {}
        else:
            with progress.step("verify", f"checking numerics in the {args.target} runtime against PyTorch"):
                numerics = replay(reference, target.runner(staging, None, max_seq_len, options))
                release_memory()
            ok, why = passed(numerics, target.tolerance)
            report["numerics"] = numerics
            report["verify"] = "passed" if ok else "failed"
            if not ok:
                print(json.dumps(report["numerics"], indent=1))
                raise VerificationError(f"numerics check failed: {why}; no artifact was written to {output.path}")
        report["timings_s"] = progress.timings
        report["peak_rss_bytes"] = {**progress.peak_rss, "child_processes": children_peak_rss_bytes()}
        # The model's side files travel with the artifacts verbatim (config, tokenizer, generation config, chat
        # template, preprocessor config; the byte-level tokenizer.json for our byte vocabulary): runners need them.
        copy_side_files(args.model_dir, config, staging)
        report["files"] = sorted([str(p.relative_to(staging)) for p in staging.rglob("*")
                                  if p.is_file() and p.name != MARKER] + [REPORT])
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        output.commit()
    finally:
        output.discard_staging()
    report["out_dir"] = str(output.path)
    return report


def model_facts(cfg, prompt) -> dict:
    """What was read from the model directory: its layout, the RoPE in use, the checkpoint dtype (weights are
    computed in fp32), the special ids and where each came from (an unknown id is reported as null and left out
    of the runner constants), and how the verification prompt was made."""
    special = prompt.special
    facts = {
        "source_format": cfg.source_format,
        "rope": {k: v for k, v in dataclasses.asdict(cfg.rope).items()
                 if v is not None and (k != "truncate" or cfg.rope.rope_type == "yarn")},
        "checkpoint_dtype": cfg.checkpoint_dtype,
        "special_token_ids": {"bos": special.bos, "eos": list(special.eos), "pad": special.pad, "image": special.image,
                              "sources": dict(special.sources)},
        # Neither the config, generation_config.json nor the tokenizer names them: runners must not guess.
        "unknown_special_ids": [name for name, known in (("bos", special.bos is not None), ("eos", bool(special.eos)))
                                if not known],
        "verification_prompt": {"source": prompt.source, "tokens": len(prompt.ids)},
        "moe_layers": list(cfg.moe.moe_layers),
    }
    if cfg.vision is not None:
        facts["vision"] = {"kind": cfg.vision.kind, "image_size": cfg.vision.image_size,
                           "image_tokens": cfg.vision.num_image_tokens}
    return facts


def summary(report: dict) -> str:
    lines = [f"mote-export: {report['target']} -> {report['out_dir']}"]
    for a in report["artifacts"]:
        lines.append(f"  {a['path']}: {a['bytes'] / 1e6:.2f} MB")
    lines.append(f"  routed experts: {report['routed_expert_bits_per_weight']:.3f} bits/weight")
    for program, s in report.get("numerics", {}).items():
        extra = f", greedy {s['greedy_match']}" if "greedy_match" in s else ""
        lines.append(f"  {program}: SQNR {s['sqnr_db']:.1f} dB, max abs err {s['max_abs_err']:.2e}{extra}")
    for d in report.get("deviations", []):
        lines.append(f"  deviation: {d}")
    unknown = report.get("model", {}).get("unknown_special_ids")
    if unknown:
        lines.append(f"  special ids: {' and '.join(unknown)} unknown (no config, generation config or tokenizer names "
                     f"them); none is assumed")
    lines.append(f"  verify: {report['verify']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:          # argparse already printed its one-line usage error
        return 0 if e.code == 0 else 2
    try:
        report = run(args)
    except MoteError as e:
        print(f"mote-export: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:        # staging already removed by run()'s cleanup
        print("mote-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception:                # a bug, not bad input: keep the traceback for the report
        traceback.print_exc()
        return 1
    print(summary(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
