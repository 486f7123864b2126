"""`--target onnx`: ONNX + ONNX Runtime, routed experts as 2-bit `com.microsoft.QMoE`, also `.ort` for ORT Mobile.

Artifacts: `vision_encoder.onnx`, `token_embedding.onnx`, `text_decoder.onnx` (KV cache as `past_key_i` /
`past_value_i` inputs and `present_key_i` / `present_value_i` outputs, static length), and the same three as `.ort`.
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance
from mote.targets import Lowered, Target, quiet_toolchain

from .repack import lower_to_ort_layouts
from .report import read_back, render
from .variants import to_fp32_experts, to_portable

# How the routed experts are stored and run: QMoE 2-bit (default), standard ops only (--portable), or float32 MoE
# (the benchmark's baseline).
VARIANTS = {"qmoe": None, "portable": to_portable, "fp32": to_fp32_experts}

OPSET = 21


def _rename_io(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    """Rename graph inputs/outputs everywhere they are referenced."""
    g = model.graph
    for vi in list(g.input) + list(g.output):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for node in g.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]


def _decoder_io_names(model: onnx.ModelProto) -> dict[str, str]:
    """The functional decoder's I/O, by position: (embeds, input_pos, k_0.., v_0..) -> (logits, k_0'.., v_0'..)."""
    inputs, outputs = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    n_layers = (len(outputs) - 1) // 2
    mapping = {inputs[0]: "embeds", inputs[1]: "input_pos", outputs[0]: "logits"}
    for i in range(n_layers):
        mapping[inputs[2 + i]] = f"past_key_{i}"
        mapping[inputs[2 + n_layers + i]] = f"past_value_{i}"
        mapping[outputs[1 + i]] = f"present_key_{i}"
        mapping[outputs[1 + n_layers + i]] = f"present_value_{i}"
    return mapping


def export_onnx(ep, path: Path, decoder: bool = False, postprocess=None) -> None:
    from .translate import TRANSLATIONS

    with quiet_toolchain():
        program = torch.onnx.export(ep, args=ep.example_inputs[0], dynamo=True, opset_version=OPSET,
                                    custom_translation_table=TRANSLATIONS, optimize=True, verbose=False)
    model = program.model_proto
    if decoder:
        _rename_io(model, _decoder_io_names(model))
    if postprocess is not None:
        model = postprocess(model)
        onnx.checker.check_model(model)
    model.producer_name, model.producer_version = "mote-export", "0.1.0"
    onnx.save_model(model, str(path), save_as_external_data=False)


def convert_to_ort(onnx_paths: list[Path]) -> list[Path]:
    """ORT Mobile format next to each .onnx (com.microsoft ops included).

    The converter runs in a child process with address-space randomisation off: ORT's flatbuffer writer orders
    some tables by pointer, so with ASLR the same model gives differently ordered (equally valid) .ort bytes.
    """
    work = onnx_paths[0].parent / ".ort-convert"
    work.mkdir()
    try:
        for p in onnx_paths:
            (work / p.name).symlink_to(p.resolve())
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work),
               "--optimization_style", "Fixed"]
        if shutil.which("setarch"):
            cmd = ["setarch", platform.machine(), "-R", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"onnx: .ort conversion failed: {proc.stderr.strip().splitlines()[-1:]}")
        out = []
        for p in onnx_paths:
            target = p.with_suffix(".ort")
            (work / f"{p.stem}.ort").rename(target)
            out.append(target)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


class OnnxTarget(Target):
    name = "onnx"
    kv_style = KVCacheStyle.IO
    tolerance = Tolerance(min_sqnr_db=35.0)   # declared kernel deviation (QMoE activation quantization)

    def lower(self, programs, model, out_dir: Path, options: dict) -> Lowered:
        weights, paths = 0, []
        for name, ep in programs.items():
            weights += lower_to_ort_layouts(ep)
            path = out_dir / f"{name}.onnx"
            export_onnx(ep, path, decoder=name == "text_decoder", postprocess=VARIANTS[options.get("experts", "qmoe")])
            paths.append(path)
        ort_paths = convert_to_ort(paths) if options.get("ort", True) else []
        # Every statement of the report is read back from the written .onnx files.
        facts = read_back(paths)
        deviations, notes = render(facts, weights)
        return Lowered(artifacts=paths + ort_paths, routed_expert_weights=weights,
                       routed_expert_bytes=facts["routed_experts"]["bytes"], deviations=deviations, notes=notes,
                       facts=facts)

    def runner(self, out_dir: Path, model, max_seq_len: int, options: dict):
        return OrtRunner(out_dir, max_seq_len, suffix=options.get("suffix", ".onnx"))


class OrtRunner:
    """The three programs in onnxruntime; the KV cache lives here as numpy arrays fed back step by step."""

    def __init__(self, out_dir: Path, max_seq_len: int, suffix: str = ".onnx"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = int(os.environ.get("MOTE_ORT_THREADS", "0"))
        self.sessions = {}
        for name in ("vision_encoder", "token_embedding", "text_decoder"):
            path = Path(out_dir) / f"{name}{suffix}"
            if path.exists():
                self.sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.max_seq_len = max_seq_len
        dec = self.sessions["text_decoder"]
        self.cache_inputs = [i for i in dec.get_inputs() if i.name.startswith("past_")]
        self.output_names = [o.name for o in dec.get_outputs()]
        self.reset()

    def reset(self):
        self.cache = {i.name: np.zeros(i.shape, dtype=np.float32) for i in self.cache_inputs}

    def vision_encoder(self, pixel_values):
        return torch.from_numpy(self.sessions["vision_encoder"].run(None, {"pixel_values": pixel_values.numpy()})[0])

    def token_embedding(self, tokens):
        return torch.from_numpy(self.sessions["token_embedding"].run(None, {"tokens": tokens.numpy()})[0])

    def text_decoder(self, embeds, input_pos):
        feeds = {"embeds": embeds.numpy().astype(np.float32), "input_pos": input_pos.numpy(), **self.cache}
        outs = dict(zip(self.output_names, self.sessions["text_decoder"].run(None, feeds)))
        for name in self.cache:
            self.cache[name] = outs[name.replace("past_", "present_")]
        return torch.from_numpy(outs["logits"])


TARGET = OnnxTarget()
