"""`mote-export`: trace a MoTE model, rewrite it into ternary `mote::` ops, lower it to a target, verify it.

    mote-export --target {android,ios,onnx,tvm} MODEL_DIR [-o OUT_DIR] [--max-seq-len N] [--quantize SPEC]
                [--no-verify] [-v | -q]
                [target options: `mote-export --target T --help` lists them]

Exit codes (DESIGN.md section 7): 0 success, 2 bad input or usage, 3 numerics verification failed, 1 anything else.
Output is staged in a hidden sibling folder and moved into place only when everything (including the numerics
check) succeeded, so a failed or interrupted run (Ctrl-C: exit 130) never leaves a half-written or unverified
artifact behind; `-o` never replaces a file or a folder holding files we did not write (tools/output_dir.py).

What it prints: our own step lines (stdout) and, on a terminal, a progress bar within long steps (stderr); the
toolchains' own output is captured (tools/console.py) and shown with `-v`. A failure is one line on stderr (with
`-v`, the traceback too).

Memory: the reference runs once, before lowering, and only its outputs are kept; after lowering the programs and
the model are released, so the target's runtime runs the artifact alone (each step's peak RSS is in the report).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import platform
import signal
import sys
import threading
import time
import traceback
from importlib.metadata import version as package_version
from pathlib import Path

from mote.export import progress as export_progress
from mote.export.errors import InputError, MoteError, VerificationError
from mote.export.memory import children_peak_rss_bytes, peak_rss_bytes, release_memory, reset_peak
from mote.targets import REGISTRY, CommonOptions
from mote.targets import artifact_bytes as artifact_size
from mote.tools.console import Console, captured_toolchain_output
from mote.tools.devices import DEVICES
from mote.tools.output_dir import MARKER, REPORT, OutputDir

PROG = "mote-export"
DEFAULT_PROMPT = "Describe the image:"
REPORT_SCHEMA = Path(__file__).resolve().parent / "report.schema.json"


def tool_version() -> str:
    return package_version("mote-export")


class Progress:
    """Step lines with their durations (so steps that take seconds are visible), progress within each step (see
    export.progress), and each step's wall time and peak RSS for the report."""

    def __init__(self, console: Console | None):
        self.console, self.timings, self.peak_rss = console, {}, {}

    @contextlib.contextmanager
    def step(self, name: str, label: str):
        if self.console is not None:
            self.console.info(f"{label} ...")
        release_memory()
        reset_peak()
        t0 = time.perf_counter()
        with export_progress.listening(self.console.progress) if self.console else contextlib.nullcontext():
            try:
                yield
            finally:
                if self.console is not None:
                    self.console.close_bar()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.peak_rss[name] = peak_rss_bytes()
        if self.console is not None:
            self.console.info(f"{label} done in {self.timings[name]:.1f} s "
                              f"(peak RSS {self.peak_rss[name] / 2**30:.2f} GiB)")


class UsageError(InputError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised, printed by main) rather than usage + message."""

    def error(self, message):
        raise UsageError(message)


def _common_parser(target_help: str) -> _Parser:
    ap = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"{PROG} {tool_version()}")
    ap.add_argument("--target", required=True, choices=sorted(REGISTRY), help=target_help)
    ap.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    ap.add_argument("-o", "--out", type=Path, help="output directory (default: out/<model>-<target>)")
    ap.add_argument("--max-seq-len", type=int, default=None, help="static KV-cache length (default: min(128, max positions))")
    ap.add_argument("--quantize", metavar="SPEC", default=None,
                    help="post-training quantization of the full-precision parts: a preset (int8, int4; 8da4w and 4w "
                         "are int4) and/or PART=SCHEME entries (parts embed, attn, shared, router, lm_head, vision; "
                         "schemes fp32, int8, int4) and group=32|64|128|256|channel, comma-separated, e.g. "
                         "int4,lm_head=int4,group=64. Routed experts stay ternary.")
    ap.add_argument("--no-verify", action="store_true", help="skip the numerics check against PyTorch")
    ap.add_argument("--smoke-test", metavar="DEVICE", choices=sorted(DEVICES), default=None,
                    help="also run the artifact on a device on the same check: arm64 = the aarch64 build of the "
                         "target's runtime under qemu (python -m mote.tools.arm64_device builds it; setup.sh does); "
                         "report.json's on_device section")
    ap.add_argument("--prompt", default=None, help="verification prompt (default: MODEL_DIR/prompt.txt or a fixed one)")
    ap.add_argument("--image", type=Path, default=None, help="verification image, PNG (default: MODEL_DIR/sample.png)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into an -o folder that holds other files (they are kept; same-named files replaced)")
    loud = ap.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="debug lines, the toolchains' own output, and the traceback of a failure")
    loud.add_argument("-q", "--quiet", action="store_true", help="errors only")
    return ap


def parse_args(argv):
    """Two passes: `--target` first, then the common flags plus that target's own (TargetOptions.add_arguments), so a
    flag of another target is refused instead of silently ignored."""
    from mote.targets import get_target

    pre = _Parser(add_help=False)
    pre.add_argument("--target", choices=sorted(REGISTRY))
    known, _ = pre.parse_known_args(argv)
    ap = _common_parser("the backend (`mote-export --target T --help` lists T's own options)")
    if known.target is None:
        return ap.parse_args(argv)   # --help / --version, or the missing --target error
    options_class = get_target(known.target).Options
    options_class.add_arguments(ap, known.target)
    args, unknown = ap.parse_known_args(argv)
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        owners = [name for name in sorted(REGISTRY) if name != known.target and flag in
                  {o.flag(f) for o in [get_target(name).Options] for f in o.cli_fields()}]
        if owners:
            raise UsageError(f"{flag} is an option of {' and of '.join(f'--target {o}' for o in owners)}, "
                             f"not of --target {known.target}")
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)}")
    args.target_options = options_class.from_args(args)
    if args.smoke_test is not None:
        if args.no_verify:
            raise UsageError("--smoke-test checks the artifact against the reference's outputs: drop --no-verify")
        if get_target(known.target).device_runner is None:
            raise UsageError(f"--smoke-test {args.smoke_test}: --target {known.target} has no runtime for "
                             f"{args.smoke_test} devices")
    args.quantization = None
    if args.quantize is not None:
        from mote.export.quantization import parse
        args.quantization = parse(args.quantize)
        supported = get_target(known.target).quantized_bits
        missing = sorted(args.quantization.used_bits - set(supported))
        if missing:
            have = ", ".join(f"int{b}" for b in supported) or "no quantized weights yet"
            raise UsageError(f"--quantize {args.quantize}: --target {known.target} does not lower "
                             f"{', '.join(f'int{b}' for b in missing)} weights (it lowers: {have})")
        refused = get_target(known.target).check_quantization(args.quantization, args.target_options)
        if refused:
            raise UsageError(f"--quantize {args.quantize}: {refused}")
    return args


def default_max_seq_len(args, config) -> int:
    """--max-seq-len, else min(DEFAULT_MAX_SEQ_LEN, the model's max positions)."""
    from mote.export.programs import DEFAULT_MAX_SEQ_LEN

    return args.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, config.max_position_embeddings)


def verification_inputs(args, model):
    """The prompt (a `Prompt`: token ids, special ids, `source`) + image every program is checked on: the model's
    shipped sample (prompt.txt, sample.png) through its own tokenizer and image preprocessing, else a fixed
    synthetic image and, without a tokenizer, a synthetic token-id prompt (`prompt.source` says which).
    Returns (prompt, pixel_values or None, the image file used or None)."""
    import torch

    from mote.export.images import load_pixel_values
    from mote.export.tokenizer import verification_prompt

    text = args.prompt
    if text is None:
        p = args.model_dir / "prompt.txt"
        text = p.read_text().strip() if p.is_file() else DEFAULT_PROMPT
    pixel_values, image_file = None, None
    vc = model.config.vision
    if vc is not None:
        image = args.image or (args.model_dir / "sample.png")
        if image.is_file() or args.image is not None:
            pixel_values, image_file = load_pixel_values(image, args.model_dir, model.config), image
        else:
            gen = torch.Generator().manual_seed(0)
            pixel_values = torch.rand(1, vc.num_channels, vc.image_size, vc.image_size, generator=gen) * 2 - 1
    prompt = verification_prompt(args.model_dir, model.config, text, pixel_values is not None)
    return prompt, pixel_values, image_file


def run(args, console: Console | None = None, argv=None) -> dict:
    from mote.export.generate import EagerRunner
    from mote.export.loader import load_model
    from mote.export.programs import export_programs
    from mote.export.tokenizer import copy_side_files
    from mote.export.verify import passed, record_reference, replay
    from mote.passes.pipeline import run_pipeline
    from mote.targets import get_target
    from mote.tools.devices import get_device
    from mote.tools.quant_eval import reference_effect
    from mote.tools.smoke import smoke_test

    started = time.perf_counter()
    progress = Progress(console)
    output = OutputDir(args.out or Path("out") / f"{args.model_dir.resolve().name}-{args.target}", args.overwrite)
    output.check()
    output.remove_stale_staging()
    get_target(args.target).preflight(args.target_options, verify=not args.no_verify)
    device = get_device(args.smoke_test) if args.smoke_test else None   # InputError now if it is not ready
    fp32_record = effect_skipped = inputs = None
    if args.quantization is not None and not args.no_verify:
        effect_skipped = fp32_reference_unaffordable(args.model_dir)
    if args.quantization is not None and not args.no_verify and effect_skipped is None:
        # The quantization's own effect is measured against the fp32 model, loaded and run first and released
        # before the quantized one is loaded: the two never hold their weights at the same time.
        with progress.step("fp32_reference", "running the fp32 PyTorch reference (the quantization's baseline)"):
            fp32_model = load_model(args.model_dir)
            inputs = verification_inputs(args, fp32_model)   # the same config: reused for the quantized model
            fp32_record = record_reference(EagerRunner(fp32_model, default_max_seq_len(args, fp32_model.config)),
                                           *inputs[:2])
            del fp32_model
    with progress.step("load", f"loading {args.model_dir}" + (f" (--quantize {args.quantize}: quantized as read)"
                                                              if args.quantization else "")):
        model = load_model(args.model_dir, args.quantization)
    config = model.config
    target = get_target(args.target)
    max_seq_len = default_max_seq_len(args, config)
    prompt, pixel_values, image_file = inputs or verification_inputs(args, model)
    reference = quantization_effect = None
    if not args.no_verify:
        # Once, now: the reference's outputs are kept (a few MB) and the model need not outlive the lowering.
        with progress.step("reference", "running the PyTorch reference on the verification prompt"):
            reference = record_reference(EagerRunner(model, max_seq_len), prompt, pixel_values)
        if fp32_record is not None:
            with progress.step("quantization_effect", "measuring the quantized reference against the fp32 one"):
                quantization_effect = reference_effect(fp32_record, model, max_seq_len)
    with progress.step("trace", f"tracing {('vision_encoder, ' if model.vision_tower is not None else '')}"
                                "token_embedding, text_decoder with torch.export"):
        programs = export_programs(model, max_seq_len, target.kv_style)
    with progress.step("passes", "rewriting MoTE blocks into mote:: ternary ops"):
        # Without an end-to-end check, the pipeline checks its own numerics on the programs' sample inputs.
        programs, pass_log = run_pipeline(programs, config.moe.moe_layers, verify=args.no_verify)

    staging = output.create_staging()
    try:
        common = CommonOptions(model_dir=args.model_dir, out_dir=staging, max_seq_len=max_seq_len,
                               quantization=args.quantization, verify=not args.no_verify,
                               special_ids=prompt.special)
        with progress.step("lower", f"lowering to {args.target}"):
            lowered = target.lower(programs, model, common, args.target_options)
        # The artifact is on disk: the programs and the model (which share the weights) are not needed any more.
        del programs, model
        release_memory()
        artifact_bytes = sum(artifact_size(p) for p in lowered.artifacts)
        report = {
            "tool": PROG,
            "tool_version": tool_version(),
            "versions": {"python": platform.python_version(), "torch": package_version("torch"),
                         **target.runtime_versions()},
            "command_line": [PROG, *(argv if argv is not None else sys.argv[1:])],
            "target": args.target,
            "model_dir": str(args.model_dir),
            "max_seq_len": max_seq_len,
            "options": {"common": {"max_seq_len": max_seq_len,
                                   "quantization": args.quantization.as_dict() if args.quantization else None,
                                   "verify": common.verify},
                        "target": args.target_options.as_dict()},
            "artifacts": [{"path": p.name, "bytes": artifact_size(p)} for p in lowered.artifacts],
            "size": size_facts(lowered, artifact_bytes),
            "routed_expert_bits_per_weight": round(lowered.routed_expert_bits_per_weight, 4),
            "routed_expert_weights": lowered.routed_expert_weights,
            "routed_expert_bytes": lowered.routed_expert_bytes,
            "deviations": lowered.deviations,
            "notes": lowered.notes,
            "facts": lowered.facts,
            "passes": pass_log,
            "model": model_facts(config, prompt, image_file),
        }
        report["memory_plan"] = memory_plan_facts(config, args.quantization, max_seq_len, artifact_bytes)
        if args.quantization is not None:
            report["quantization"] = {**args.quantization.as_dict(), "quantized_ops": {
                name: entry["quantized_ops"] for name, entry in pass_log.items() if "quantized_ops" in entry},
                # The quantized reference against the fp32 one (DESIGN.md section 6): the quantization's own effect;
                # `numerics` compares the artifact with the quantized reference.
                "effect": quantization_effect}
            if effect_skipped is not None:
                report["quantization"]["effect_skipped"] = effect_skipped
        if args.no_verify:
            report["verify"] = "skipped"
            report["numerics"] = {}
        else:
            with progress.step("verify", f"checking numerics in the {args.target} runtime against PyTorch"):
                numerics = replay(reference, target.runner(staging, max_seq_len))
                release_memory()
            tolerance = target.tolerance_for(lowered)
            ok, why = passed(numerics, tolerance)
            report["numerics"] = numerics
            report["verify"] = "passed" if ok else "failed"
            report["tolerance"] = dataclasses.asdict(tolerance)
            if not ok:
                raise VerificationError(f"numerics check failed: {why}; no artifact was written to {output.path}")
        if device is not None:
            with progress.step("smoke_test", f"running the artifact on the {device.name} device "
                                             f"({device.kind} {device.arch})"):
                report["on_device"] = smoke_test(target, staging, reference, tolerance, device, numerics)
            if not report["on_device"]["passed"]:
                raise VerificationError(f"on-device check ({device.name}) failed: {report['on_device']['failure']}; "
                                        f"no artifact was written to {output.path}")
        report["timings_s"] = {**progress.timings, "total": round(time.perf_counter() - started, 3)}
        report["peak_rss_bytes"] = {**progress.peak_rss, "child_processes": children_peak_rss_bytes()}
        # The model's side files travel with the artifacts verbatim (config, tokenizer, generation config, chat
        # template, preprocessor config; the byte-level tokenizer.json for our byte vocabulary): runners need them.
        copy_side_files(args.model_dir, config, staging)
        report["files"] = sorted([str(p.relative_to(staging)) for p in staging.rglob("*")
                                  if p.is_file() and p.name != MARKER] + [REPORT])
        (staging / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if _interrupts.requested:
            raise KeyboardInterrupt   # a Ctrl-C that some finalizer swallowed still means: nothing is written
        output.commit()
    finally:
        output.discard_staging()
    report["out_dir"] = str(output.path)
    return report


def size_facts(lowered, artifact_bytes: int) -> dict:
    """The artifacts' bytes against an estimate of the same export with float32 routed experts (4 bytes a weight
    in place of what the routed experts take now): what keeping them ternary saves."""
    fp32 = artifact_bytes - lowered.routed_expert_bytes + 4 * lowered.routed_expert_weights
    return {"artifact_bytes": artifact_bytes, "fp32_experts_estimate_bytes": fp32,
            "ratio_to_fp32_experts_estimate": round(artifact_bytes / max(fp32, 1), 4)}


# The fp32 reference's peak over its weights (the loader's conversion buffers and the allocator's free lists; at the
# 3B shape it passed 1.6x, 22 GiB for 13.8 GiB of weights, and was still growing): it is run only where that much
# memory is available.
FP32_REFERENCE_HEADROOM = 2.0


def fp32_reference_unaffordable(model_dir: Path) -> str | None:
    """Why the fp32 reference (the quantization's baseline) is not run, or None when it fits: its weights as the
    memory plan counts them (dense fp32, routed experts packed) times FP32_REFERENCE_HEADROOM against the memory
    available now. At the 3B shape it does not fit in 24 GB, which is what --quantize is for."""
    from mote.export.config import load_config
    from mote.export.memory import available_bytes
    from mote.export.memory_plan import plan

    need = plan(load_config(model_dir)).total("exported") * FP32_REFERENCE_HEADROOM
    available = available_bytes()
    if available is None or need <= available:
        return None
    return (f"the fp32 reference would need about {need / 2**30:.1f} GiB ({FP32_REFERENCE_HEADROOM}x its "
            f"{need / FP32_REFERENCE_HEADROOM / 2**30:.1f} GiB of weights), {available / 2**30:.1f} GiB are available")


def memory_plan_facts(config, quantization, max_seq_len: int, artifact_bytes: int) -> dict:
    """`mote-inspect --plan`'s table for this export (bytes by part, fp16 vs as exported, the KV cache at
    max_seq_len; export/memory_plan.py, from the model as it was lowered), and the artifacts' real total beside the
    plan's: what the format adds (headers, packing padding, a target's fp16 storage) or saves."""
    from mote.export.memory_plan import plan

    table = plan(config, quantization, max_seq_len).as_dict()
    table["artifact_bytes"] = artifact_bytes
    table["artifact_over_plan"] = round(artifact_bytes / max(table["weights"]["exported"], 1), 4)
    return table


def model_facts(cfg, prompt, image_file: Path | None) -> dict:
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
        "verification_prompt": {"source": prompt.source, "tokens": len(prompt.ids),
                                "image": str(image_file) if image_file is not None else None},
        "moe_layers": list(cfg.moe.moe_layers),
    }
    if cfg.vision is not None:
        facts["vision"] = {"kind": cfg.vision.kind, "image_size": cfg.vision.image_size,
                           "image_tokens": cfg.vision.num_image_tokens}
    return facts


def _numerics_line(stats: dict) -> str:
    if stats.get("exact"):
        text = "exact (bit-identical to PyTorch)"
    else:
        text = f"SQNR {stats['sqnr_db']:.1f} dB, max abs err {stats['max_abs_err']:.2e}"
    return text + (f", greedy {stats['greedy_match']}" if "greedy_match" in stats else "")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def summary(report: dict) -> str:
    """What went where, in the manner of optimum-cli / ExecuTorch's export_llm."""
    out = report["out_dir"]
    rows = [(a["path"], _mb(a["bytes"])) for a in report["artifacts"]]
    size = report["size"]
    rows.append(("total", f"{_mb(size['artifact_bytes'])}, {size['ratio_to_fp32_experts_estimate']:.2f}x an fp32-expert "
                          f"export (about {_mb(size['fp32_experts_estimate_bytes'])})"))
    rows.append(("routed experts", f"{report['routed_expert_bits_per_weight']:.3f} bits/weight "
                                   f"({_mb(report['routed_expert_bytes'])} for {report['routed_expert_weights']:,} weights)"))
    for program, stats in report.get("numerics", {}).items():
        rows.append((program, _numerics_line(stats)))
    quant = report.get("quantization")
    if quant is not None:
        parts = ", ".join(f"{p} {b}" for p, b in quant["parts"].items() if b)
        effect = quant["effect"]
        rows.append(("quantized", parts + (f"; vs the fp32 reference: decoder SQNR "
                                           f"{effect['text_decoder']['sqnr_db']:.1f} dB, greedy "
                                           f"{effect['text_decoder']['greedy_match']}" if effect else "")))
        if "effect_skipped" in quant:
            rows.append(("quantization effect", f"not measured: {quant['effect_skipped']}"))
    rows += [("deviation", d) for d in report.get("deviations", [])]
    unknown = report.get("model", {}).get("unknown_special_ids")
    if unknown:
        rows.append(("special ids", f"{' and '.join(unknown)} unknown (no config, generation config or tokenizer "
                                    "names them); none is assumed"))
    verify = report["verify"]
    if verify == "passed":
        tol = report["tolerance"]
        verify += f" in the {report['target']} runtime (bar: SQNR >= {tol['min_sqnr_db']:g} dB" + (
            ", identical greedy tokens)" if tol["need_identical_greedy"] else ")")
    rows.append(("verify", verify))
    on_device = report.get("on_device")
    if on_device is not None:
        dev, runtime = on_device["device"], on_device["runtime"]
        decoder = on_device["numerics"]["text_decoder"]
        kernels = f" with our {runtime['kernels_isa']} kernels" if "kernels_isa" in runtime else ""
        rows.append((f"on {dev['device']}", f"{'passed' if on_device['passed'] else 'failed'} in {runtime['runtime']} "
                                            f"{runtime['version']}{kernels} on {dev['kind']} {dev['arch']} "
                                            f"({dev['emulator']}): decoder SQNR {decoder['sqnr_db']:.1f} dB, greedy "
                                            f"{decoder['greedy_match']}"))
    rows.append(("report", str(Path(out) / REPORT)))
    model = report["model"]
    image = model["verification_prompt"]["image"] or ("IMAGE" if model.get("vision") else None)
    image = f" --image {image}" if image else ""
    rows.append(("try it", f"mote-run {out}{image}"))
    width = max(len(k) for k, _ in rows)
    total = report["timings_s"]["total"]
    lines = [f"{PROG}: exported {report['model_dir']} for {report['target']} in {total:.1f} s -> {out}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


class _Interrupts:
    """Ctrl-C raises KeyboardInterrupt as usual, and is also remembered: Python runs a signal handler at the next
    bytecode, which may be inside a finalizer (`__del__`, a weakref callback) run by the garbage collector, where the
    exception is printed as "ignored" and the export would go on to completion. `run` checks `requested` before it
    commits the output."""

    requested = False

    @classmethod
    def handler(cls, signum, frame):
        cls.requested = True
        signal.default_int_handler(signum, frame)


_interrupts = _Interrupts


def main(argv=None) -> int:
    """The command line (exit codes of DESIGN.md section 7), with Ctrl-C remembered while it runs (`_Interrupts`)."""
    if threading.current_thread() is not threading.main_thread():   # signal handlers belong to the main thread
        return _main(argv)
    _interrupts.requested = False
    previous = signal.signal(signal.SIGINT, _interrupts.handler)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGINT, previous)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        args = parse_args(argv)
    except SystemExit as e:          # --help / --version printed what was asked
        return 0 if e.code in (0, None) else 2
    except MoteError as e:           # a usage error: one line
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    capture = captured_toolchain_output(enabled=not args.verbose)
    error, exit_code = None, 0
    with capture:
        console = Console(PROG, -1 if args.quiet else (1 if args.verbose else 0), capture.stdout, capture.stderr)
        try:
            report = run(args, console, argv)
        except MoteError as e:
            error, exit_code = str(e), e.exit_code
        except KeyboardInterrupt:    # staging already removed by run()'s cleanup
            error, exit_code = "interrupted; nothing was written", 130
        except Exception as e:       # a bug, not bad input
            if verbose:
                traceback.print_exc(file=capture.stderr)
            error, exit_code = f"internal error: {type(e).__name__}: {e}" + ("" if verbose else " (-v shows the traceback)"), 1
        finally:
            console.close_bar()
    if error is not None:
        log = capture.save(PROG) if exit_code not in (2, 130) else None
        what = "" if exit_code == 130 else "error: "   # Ctrl-C is the user's choice, not an error
        print(f"{PROG}: {what}{error}" + (f" (toolchain output: {log})" if log else ""), file=sys.stderr)
        return exit_code
    if not args.quiet:
        print(summary(report), file=capture.stdout, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
