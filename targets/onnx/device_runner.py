"""The three programs in onnxruntime, numpy in and out: what runs on a device (targets/on_device.py loads this file
by its path there, so it imports only the standard library, numpy and onnxruntime), and the core of the host's
`OrtRunner`. The KV cache lives here as numpy arrays fed back step by step.

On a device the `.ort` files (ORT Mobile's format) run when the export wrote them, else the `.onnx` ones.
"""
from __future__ import annotations

import os

import numpy as np

PROGRAMS = ("vision_encoder", "token_embedding", "text_decoder")


class OrtPrograms:
    def __init__(self, out_dir, max_seq_len=None, suffix=".onnx", threads=None):
        import onnxruntime as ort

        self.sessions = {}
        for name in PROGRAMS:
            path = os.path.join(str(out_dir), f"{name}{suffix}")
            if os.path.exists(path):
                self.sessions[name] = ort.InferenceSession(path, self.session_options(name, threads),
                                                           providers=["CPUExecutionProvider"])
        dec = self.sessions["text_decoder"]
        self.cache_inputs = [i for i in dec.get_inputs() if i.name.startswith("past_")]
        self.output_names = [o.name for o in dec.get_outputs()]
        # every cache input is [batch, kv heads, max_seq_len, head dim]
        self.max_seq_len = max_seq_len or self.cache_inputs[0].shape[2]
        self.reset()

    def session_options(self, name, threads):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        # intra-op threads (sequential execution, the default, runs one node at a time); 0: ORT's default
        so.intra_op_num_threads = threads if threads is not None else int(os.environ.get("MOTE_ORT_THREADS", "0"))
        return so

    def reset(self):
        self.cache = {i.name: np.zeros(i.shape, dtype=np.float32) for i in self.cache_inputs}

    def vision_encoder(self, pixel_values):
        return self.sessions["vision_encoder"].run(None, {"pixel_values": pixel_values})[0]

    def token_embedding(self, tokens):
        return self.sessions["token_embedding"].run(None, {"tokens": tokens})[0]

    def text_decoder(self, embeds, input_pos):
        feeds = {"embeds": np.asarray(embeds, dtype=np.float32), "input_pos": input_pos, **self.cache}
        outs = dict(zip(self.output_names, self.sessions["text_decoder"].run(None, feeds)))
        for name in self.cache:
            self.cache[name] = outs[name.replace("past_", "present_")]
        return outs["logits"]

    def runtime(self):
        import onnxruntime as ort

        files = sorted(os.path.basename(s._model_path) for s in self.sessions.values())
        return {"runtime": "onnxruntime", "version": ort.__version__, "files": files,
                "providers": ["CPUExecutionProvider"]}


def open_runner(artifact_dir, options):
    ort_files = all(os.path.exists(os.path.join(artifact_dir, f"{name}.ort")) for name in ("token_embedding",
                                                                                            "text_decoder"))
    return OrtPrograms(artifact_dir, suffix=".ort" if ort_files else ".onnx", threads=options.get("threads"))
