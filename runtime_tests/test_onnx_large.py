"""ONNX target past the format limits (DESIGN.md section 10), on a tiny model with the limits forced low.

The same lowering path a 0.5B-shaped model takes: initializers in one external data file per model (protobuf's
2 GiB limit), no .ort where the model is above the ORT format's limit (a single FlatBuffer), and that reported.
"""
import json

import onnx
import onnxruntime
import pytest
import torch

from mote.export.generate import EagerRunner
from mote.export.loader import load_model, save_model
from mote.export.programs import export_programs
from mote.export.tokenizer import verification_prompt
from mote.export.verify import compare, passed
from mote.passes.pipeline import run_pipeline
from mote.targets import CommonOptions, get_target
from mote.targets.onnx import DEFAULT_EXTERNAL_DATA_THRESHOLD, DEFAULT_ORT_SIZE_LIMIT, PROTOBUF_LIMIT
from mote.tools.make_random_model import random_config, random_model

MAX_SEQ_LEN = 32
PROGRAMS = ("vision_encoder", "token_embedding", "text_decoder")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    save_model(random_model(random_config(top_k=2), 21), d)
    return d


def _lower(model_dir, out, **options):
    model = load_model(model_dir)
    target = get_target("onnx")
    programs, _ = run_pipeline(export_programs(model, MAX_SEQ_LEN, target.kv_style), model.config.moe.moe_layers)
    out.mkdir()
    lowered = target.lower(programs, model, CommonOptions(None, out, MAX_SEQ_LEN), target.Options(**options))
    return model, lowered


def _external_locations(path):
    m = onnx.load(str(path), load_external_data=False)
    inline = {t.name: len(t.raw_data) for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    locations = {e.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return locations, inline


def test_defaults_keep_a_margin_below_the_format_limits():
    assert DEFAULT_EXTERNAL_DATA_THRESHOLD <= PROTOBUF_LIMIT - (256 << 20)
    assert DEFAULT_ORT_SIZE_LIMIT < 2**31


def test_small_model_stays_one_file(model_dir, tmp_path):
    _, lowered = _lower(model_dir, tmp_path / "out", ort=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f"{n}.onnx" for n in PROGRAMS)
    assert all(not f["external_data"]["files"] for f in lowered.facts["files"].values())
    assert "ort" not in lowered.facts


def test_external_data_runs_in_onnxruntime_and_skips_the_ort(model_dir, tmp_path):
    out = tmp_path / "out"
    # threshold 0: every model uses external data; the .ort limit sits between the text decoder and the others
    probe = tmp_path / "probe"
    _, small = _lower(model_dir, probe, ort=False)
    sizes = {n: f["initializer_bytes"] for n, f in small.facts["files"].items()}
    limit = (sizes["text_decoder.onnx"] + max(sizes["vision_encoder.onnx"], sizes["token_embedding.onnx"])) // 2
    assert sizes["text_decoder.onnx"] > limit > max(sizes["vision_encoder.onnx"], sizes["token_embedding.onnx"])
    model, lowered = _lower(model_dir, out, external_data_threshold=0, ort_size_limit=limit)

    # one data file per model, beside it, holding every initializer's bytes
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{n}.onnx" for n in PROGRAMS] + [f"{n}.onnx.data" for n in PROGRAMS]
                           + ["token_embedding.ort", "vision_encoder.ort"])
    for n in PROGRAMS:
        locations, inline = _external_locations(out / f"{n}.onnx")
        assert locations == {f"{n}.onnx.data"}
        assert max(inline.values(), default=0) <= 1024                  # only scalars and small constants inline
        f = lowered.facts["files"][f"{n}.onnx"]
        assert f["external_data"]["files"] == [f"{n}.onnx.data"]
        assert f["external_data"]["bytes"] + sum(inline.values()) == f["initializer_bytes"]
        assert any(note.startswith(f"{n}.onnx: ") and f"{n}.onnx.data" in note for note in lowered.notes)
    assert {p.name for p in lowered.artifacts} == set(names)
    onnx.checker.check_model(str(out / "text_decoder.onnx"))

    # the .ort skip is a read-back fact and a note; the models under the limit still get theirs
    ort = lowered.facts["ort"]
    assert ort["size_limit_bytes"] == limit
    assert ort["files"]["text_decoder.ort"]["written"] is False
    assert "FlatBuffer" in ort["files"]["text_decoder.ort"]["reason"]
    assert ort["files"]["token_embedding.ort"] == {"written": True,
                                                   "bytes": (out / "token_embedding.ort").stat().st_size}
    assert any(note.startswith("text_decoder.ort not written: ") for note in lowered.notes)
    json.dumps(lowered.facts)

    # ONNX Runtime loads the models from the output directory and matches the reference
    target = get_target("onnx")
    runner = target.runner(out, MAX_SEQ_LEN)
    prompt = verification_prompt(model_dir, model.config, "abc", with_image=True)
    numerics = compare(EagerRunner(model, MAX_SEQ_LEN), runner, prompt, torch.rand(1, 3, 16, 16) * 2 - 1)
    ok, why = passed(numerics, target.tolerance)
    assert ok, why
    matched, total = numerics["text_decoder"]["greedy_match"].split("/")
    assert matched == total and int(total) > 10
    # the .ort made from an external-data .onnx holds the weights itself and computes the same
    a = onnxruntime.InferenceSession(str(out / "token_embedding.onnx"), providers=["CPUExecutionProvider"])
    b = onnxruntime.InferenceSession(str(out / "token_embedding.ort"), providers=["CPUExecutionProvider"])
    tokens = {"tokens": torch.tensor([[1, 2, 3]]).numpy()}
    assert (a.run(None, tokens)[0] == b.run(None, tokens)[0]).all()


def test_external_data_export_is_deterministic(model_dir, tmp_path):
    options = {"external_data_threshold": 0, "ort_size_limit": 0}
    _lower(model_dir, tmp_path / "a", **options)
    _lower(model_dir, tmp_path / "b", **options)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted([f"{n}.onnx" for n in PROGRAMS] + [f"{n}.onnx.data" for n in PROGRAMS])
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
