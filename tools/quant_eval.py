"""The quantization's own effect (issue 14, DESIGN.md section 6): the PyTorch reference holding `--quantize`d
weights against the fp32 reference, before any target is involved.

    python -m mote.tools.quant_eval [MODEL_DIR] [--quantize SPEC ...] [--json FILE]

For each spec: SQNR of every program's output and greedy agreement over 32 tokens on the verification prompt (the
quantized model teacher-forced on the fp32 model's inputs, `export.verify.replay`); on the shipped example also
bits/byte on the held-out 5% of its text corpus and caption accuracy on its 144 held-out images (the measures of
`tools/train_example.py`, which wrote the example's README figures). `mote-export --quantize` reports the first two
in report.json (`quantization.effect`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-mote"


def reference_effect(fp32_record, model, max_seq_len: int) -> dict:
    """Per program: the quantized reference against the recorded fp32 one (SQNR, max error, greedy agreement)."""
    from mote.export.generate import EagerRunner
    from mote.export.verify import replay

    stats = replay(fp32_record, EagerRunner(model, max_seq_len))
    for program in stats.values():
        program.pop("reference_tokens", None)
        program.pop("reference_noise_floor_db", None)
    return stats


def example_scores(model) -> dict:
    """Caption accuracy on the example's held-out images, and bits/byte on its held-out text."""
    from mote.tools import train_example as ex

    imgs, labels = ex.make_eval_set(1000, per_combo=2)      # the seed train_example evaluates with (seed 0 + 1000)
    pixels = torch.cat([ex.preprocess_image(i, ex.IMAGE_SIZE) for i in imgs])
    prompt_ids = ex.encode((EXAMPLE / "prompt.txt").read_text().strip())
    captions = ex.caption_scores(ex.batched_greedy(model, pixels, prompt_ids, 48), labels)
    return {"held_out_images": len(labels), "caption_exact": captions["exact"],
            "caption_slots": {k: captions[k] for k in ("color", "shape", "position")},
            "text_bits_per_byte": round(ex.text_val_bpb(model, ex.TextData(ex.load_corpus()[0])), 4)}


def evaluate(model_dir: Path, specs: list[str], max_seq_len: int = 128) -> dict:
    from mote.export.generate import EagerRunner
    from mote.export.loader import load_model
    from mote.export.quantization import parse
    from mote.export.verify import record_reference
    from mote.tools.cli import verification_inputs

    fp32 = load_model(model_dir)
    args = argparse.Namespace(prompt=None, image=None, model_dir=model_dir)
    prompt, pixel_values, _ = verification_inputs(args, fp32)
    record = record_reference(EagerRunner(fp32, max_seq_len), prompt, pixel_values)
    is_example = model_dir.resolve() == EXAMPLE
    rows = {"fp32": {"effect": None, **({"example": example_scores(fp32)} if is_example else {})}}
    for spec in specs:
        model = load_model(model_dir, parse(spec))
        rows[spec] = {"effect": reference_effect(record, model, max_seq_len),
                      **({"example": example_scores(model)} if is_example else {})}
    return rows


def table(rows: dict) -> str:
    lines = ["| --quantize | vision SQNR | decoder SQNR | greedy | caption exact | bits/byte |", "|---|---|---|---|---|---|"]
    for spec, row in rows.items():
        eff, ex = row["effect"] or {}, row.get("example", {})
        vision = f"{eff['vision_encoder']['sqnr_db']:.1f} dB" if "vision_encoder" in eff else "-"
        decoder = f"{eff['text_decoder']['sqnr_db']:.1f} dB" if eff else "-"
        greedy = eff["text_decoder"]["greedy_match"] if eff else "-"
        caps = f"{ex['caption_exact']:.1%} of {ex['held_out_images']}" if ex else "-"
        bpb = f"{ex['text_bits_per_byte']:.3f}" if ex else "-"
        lines.append(f"| {spec} | {vision} | {decoder} | {greedy} | {caps} | {bpb} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path, nargs="?", default=EXAMPLE)
    ap.add_argument("--quantize", action="append", default=None, help="a --quantize spec (repeatable)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    rows = evaluate(a.model_dir, a.quantize or ["int8", "int4"])
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
