"""`mote-run OUT_DIR`: caption an image (or continue a prompt) with exported artifacts, in the target's own runtime.

    mote-run out/tiny-mote-onnx --image examples/tiny-mote/sample.png [--prompt "Describe the image:"]

Reads `report.json` (which target, the KV-cache length) and the model's side files mote-export copied into OUT_DIR:
`config.json`, the tokenizer (`tokenizer.json`, its config, `generation_config.json` for the stop tokens, the chat
template) and `preprocessor_config.json` for images. Nothing runs in PyTorch except tensor plumbing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mote.export.errors import InputError, MoteError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="mote-run", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--image", type=Path, default=None, help="PNG, JPEG, ... (read with Pillow)")
    ap.add_argument("--prompt", default="Describe the image:")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--suffix", default=None, help="artifact variant to run, e.g. .ort (onnx target)")
    ap.add_argument("--no-chat-template", action="store_true",
                    help="prompt = BOS + image + the tokenized text, even if the model has a chat template")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the runtimes' own output")
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:
        return 0 if e.code == 0 else 2
    from mote.tools.console import captured_toolchain_output

    # The runtimes print on load (ExecuTorch's cpuinfo lines, torchao's extension loads): kept aside unless -v.
    with captured_toolchain_output(enabled=not args.verbose) as capture:
        try:
            tokens, tokenizer = _generate(args)
        except MoteError as e:
            error = e
        else:
            error = None
    if error is not None:
        print(f"mote-run: error: {error}", file=sys.stderr)
        return error.exit_code
    print(tokenizer.decode(tokens), file=capture.stdout)
    return 0


def _generate(args):
    """(greedy tokens, tokenizer) for the prompt and image, through the artifacts in the target's runtime."""
    from mote.export.config import load_config
    from mote.export.generate import greedy_generate
    from mote.export.images import load_pixel_values
    from mote.export.tokenizer import require_tokenizer
    from mote.targets import get_target

    report_path = args.out_dir / "report.json"
    if not report_path.is_file():
        raise InputError(f"{report_path}: not found (is {args.out_dir} a mote-export output directory?)")
    report = json.loads(report_path.read_text())
    cfg = load_config(args.out_dir)
    tokenizer = require_tokenizer(args.out_dir, cfg)
    pixel_values = None
    if args.image is not None:
        if cfg.vision is None:
            raise InputError(f"{args.out_dir}: this model has no vision tower; drop --image")
        pixel_values = load_pixel_values(args.image, args.out_dir, cfg)
    prompt = tokenizer.prompt(args.prompt, pixel_values is not None, use_chat_template=not args.no_chat_template)
    extra = {"suffix": args.suffix} if args.suffix else {}
    runner = get_target(report["target"]).runner(args.out_dir, report["max_seq_len"], **extra)
    tokens, _ = greedy_generate(runner, prompt.ids, pixel_values, args.max_new_tokens, prompt.special)
    return tokens, tokenizer


if __name__ == "__main__":
    raise SystemExit(main())
