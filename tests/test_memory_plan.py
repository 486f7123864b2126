"""`mote-inspect --plan`: the memory plan from the config alone, checked against the bytes of really loaded models
(counted here, tensor by tensor, not with the plan's code) and against the paper's memory figures."""
import dataclasses
import json
import shutil
from collections import Counter
from itertools import chain

import pytest

from mote.export.config import load_config, parse_config
from mote.export.errors import InputError
from mote.export.loader import load_model, save_model
from mote.export.memory_plan import plan
from mote.export.model import QuantizedLinear, TernaryLinear
from mote.export.quantization import parse
from mote.tools import inspect_model
from mote.tools.make_random_model import random_config, random_model
from mote.tools.scale_bench import qwen25_config

from .conftest import EXAMPLE

GIB = 2**30


def stored_tensors(model):
    """(module name, module, leaf, tensor) of every weight the loaded model holds (not the RoPE table, which the
    programs rebuild from the config)."""
    for name, module in model.named_modules():
        for leaf, t in chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if leaf != "inv_freq":
                yield name, module, leaf, t


def real_bytes(model) -> Counter:
    """Bytes by coarse part of a loaded model as exported: int4/int8 values at bits/8 bytes, everything else as
    stored (packed trits uint8 + fp32 scales, fp32 qscales, biases, norms)."""
    out = Counter()
    for name, module, leaf, t in stored_tensors(model):
        n = t.numel() * t.element_size()
        if isinstance(module, QuantizedLinear) and leaf == "qweight":
            n = t.numel() * module.bits // 8
        part = ("routed" if ".experts." in name else "embed" if name == "model.embed_tokens"
                else "lm_head" if name == "lm_head" else "rest")
        out[part] += n
    return out


def fp16_bytes(model) -> int:
    """2 bytes per weight of the unquantized loaded model; a packed expert counts its [out, in] weights."""
    n = 0
    for _, module, _, t in stored_tensors(model):
        n += 0 if isinstance(module, TernaryLinear) else t.numel()
    n += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, TernaryLinear))
    return 2 * n


@pytest.fixture(scope="module")
def untied_per_channel_dir(tmp_path_factory):
    """A random model with an untied head, per-output-channel expert scales, an expert width that is not a multiple
    of 4 (padded codes), a dense layer and a vision tower."""
    cfg = random_config(layers=3, moe_layers=[0, 2], per_channel=True, shared_expert_gate=True, expert_intermediate=90)
    cfg["tie_word_embeddings"] = False
    out = tmp_path_factory.mktemp("untied")
    save_model(random_model(cfg), out)
    return out


@pytest.mark.parametrize("which, spec", [("example", None), ("example", "int4"), ("example", "int8"),
                                         ("untied", None), ("untied", "int4,lm_head=int4,vision=fp32,group=64"),
                                         ("untied", "shared=int4,embed=int8")])
def test_plan_matches_loaded_model(which, spec, untied_per_channel_dir):
    model_dir = EXAMPLE if which == "example" else untied_per_channel_dir
    q = parse(spec) if spec else None
    model = load_model(model_dir, q)
    real = real_bytes(model)
    p = plan(load_config(model_dir), q, max_seq_len=48)
    assert p.exported["routed"] == real["routed"] > 0
    assert p.exported["embed"] == real["embed"]
    assert p.exported["lm_head"] == real["lm_head"]
    assert p.total("exported") == sum(real.values())
    assert p.total("exported", non_embedding=True) == real["routed"] + real["rest"]
    if q is None:
        assert p.total("fp16") == fp16_bytes(model)
    else:       # the quantized parts really are smaller than fp32: the count above saw int8/int4 weights
        assert p.total("exported") < sum(real_bytes(load_model(model_dir)).values())
    k, v = model.new_cache(48)
    assert p.kv_cache["fp32"] == sum(t.numel() * t.element_size() for t in k + v) == 2 * p.kv_cache["fp16"]


def test_tied_head_copy_only_when_quantized():
    cfg = load_config(EXAMPLE)
    assert cfg.tie_word_embeddings
    assert plan(cfg).exported["lm_head"] == 0
    # The loader gives the head its own module when the embedding or the head is quantized; here: head fp32.
    copy = plan(cfg, parse("embed=int8")).exported["lm_head"]
    assert copy == cfg.vocab_size * cfg.hidden_size * 4


@pytest.mark.parametrize("tensor_file", ["garbage", "absent"])
def test_plan_reads_no_tensor_file(tensor_file, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(EXAMPLE / "config.json", d / "config.json")
    if tensor_file == "garbage":
        (d / "model.safetensors").write_bytes(b"\xff" * 1000)
    with pytest.raises(InputError):          # the loader would refuse this directory ...
        load_model(d)
    for spec in ([], ["--quantize", "int4"]):   # ... the plan never opens its tensor file
        assert inspect_model.main(["--plan", "--json", str(d), *spec]) == 0
        got = json.loads(capsys.readouterr().out)
        assert inspect_model.main(["--plan", "--json", str(EXAMPLE), *spec]) == 0
        want = json.loads(capsys.readouterr().out)
        assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in want.items() if k != "model"}


def test_3b_shape_reproduces_the_papers_figures():
    """The paper's introduction: a 16-expert fp16 MoE on Qwen2.5-3B raises non-embedding memory from 5.2 GB to
    73.2 GB. Qwen2.5-3B has 2.77 B non-embedding and 3.09 B weights in all (its model card)."""
    cfg = parse_config(qwen25_config("3b"))
    ours = plan(cfg)
    dense = ours.total("fp16", non_embedding=True) - ours.fp16["routed"] - ours.fp16["router"]
    assert dense / 2 == pytest.approx(2.77e9, rel=0.005)
    assert (dense + ours.fp16["embed"]) / 2 == pytest.approx(3.09e9, rel=0.005)
    assert dense / GIB == pytest.approx(5.2, rel=0.01)
    # MoE-LLaVA: 16 fp16 copies of the FFN replace it in every layer, a router picks them; no shared expert.
    moe = dataclasses.replace(cfg.moe, num_experts=16, expert_intermediate_size=cfg.intermediate_size)
    llava = plan(dataclasses.replace(cfg, moe=moe))
    llava_gib = (llava.total("fp16", non_embedding=True) - llava.fp16["shared"]) / GIB
    assert llava_gib == pytest.approx(73.2, rel=0.01)
    # Ours: shared + 4 routed experts, routed ones at 2 bits (+ one fp32 scale per tensor).
    routed = 36 * 4 * 3 * 2048 * 11008
    assert ours.fp16["routed"] == 2 * routed
    assert ours.exported["routed"] == routed // 4 + 36 * 4 * 3 * 4


def test_shape_cli_prints_the_paper_framing(capsys):
    assert inspect_model.main(["--plan", "--shape", "3b", "--json"]) == 0
    f = json.loads(capsys.readouterr().out)["paper_framing"]
    assert f["paper_gb"] == {"dense_fp16": 5.2, "moe_llava_fp16": 73.2}
    assert f["moe_llava_fp16"] / GIB == pytest.approx(73.2, rel=0.01)
    assert f["dense_fp16"] / GIB == pytest.approx(5.2, rel=0.01)
    assert inspect_model.main(["--plan", "--shape", "3b", "--quantize", "int4"]) == 0
    out = capsys.readouterr().out
    assert "73.2" in out and "5.2" in out and "difference:" in out and "GiB" in out
    assert "own quantized copy" in out       # the tied head, quantized to int8 beside the int8 embedding


@pytest.mark.parametrize("argv, message", [
    (["--plan", "--quantize", "int3", str(EXAMPLE)], "unknown preset 'int3'"),
    (["--plan", "--quantize", "router=int8", str(EXAMPLE)], "router"),
    (["--plan", "--quantize", "int4,group=256", str(EXAMPLE)], "does not divide"),
    (["--plan", "--max-seq-len", "0", str(EXAMPLE)], "--max-seq-len"),
    (["--plan"], "MODEL_DIR or --shape"),
    (["--plan", "--shape", "3b", str(EXAMPLE)], "not both"),
    (["--shape", "3b"], "need --plan"),
    (["--plan", "/nonexistent/model"], "not a directory"),
])
def test_cli_refusals_are_one_line(argv, message, capsys):
    assert inspect_model.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and captured.out == ""
