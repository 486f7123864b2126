"""Every registered target, one suite: its artifacts run in its real runtime (`Target.runner`) and are checked against
the eager PyTorch reference (DESIGN.md sections 5-7). Only the target contract (targets/base.py) is used here, so a
new target gets all of it by registering; its own checks (runner constants, `.ort`, delegation, ...) live beside
this file in test_<backend>_runtime.py.

Exports are shared (runtime_tests/conftest.py): the example model and the odd-width random model are exported once
per target and serve every test that reads them.
"""
import json
import tempfile

import pytest
import torch

from mote.export.generate import EagerRunner, greedy_generate
from mote.export.images import load_pixel_values
from mote.export.loader import load_model, save_model
from mote.export.quantization import parse
from mote.export.tokenizer import require_tokenizer
from mote.export.verify import sqnr_db
from mote.targets import REGISTRY, artifact_bytes, get_target
from mote.tools import cli
from mote.tools.make_random_model import random_config, random_model, write_qwen2_moe

TARGETS = sorted(REGISTRY)
PROGRAMS = {"vision_encoder", "token_embedding", "text_decoder"}
# What report.json says about the files written (a re-export must say the same; the rest is about the run).
WRITTEN = ("target", "max_seq_len", "artifacts", "files", "size", "routed_expert_bits_per_weight",
           "routed_expert_weights", "routed_expert_bytes", "deviations", "notes", "facts", "model")

per_target = pytest.mark.parametrize("target", TARGETS)


def check_verified(report: dict, target: str, programs=PROGRAMS) -> None:
    """The export's own numerics check ran in the target's runtime and met the target's bar (DESIGN.md 6)."""
    bar = get_target(target).tolerance.min_sqnr_db
    assert report["target"] == target
    assert report["verify"] == "passed"
    assert set(report["numerics"]) == set(programs)
    for program, stats in report["numerics"].items():
        assert stats["sqnr_db"] >= bar, program
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"


def routed_weights(cfg) -> int:
    """Routed-expert weights of a model: gate, up (I x d) and down (d x I) per expert per MoE layer."""
    return len(cfg.moe.moe_layers) * cfg.moe.num_experts * 3 * cfg.hidden_size * cfg.moe.expert_intermediate_size


# -- the shipped example ----------------------------------------------------------------------------------------

@per_target
def test_example_exports_verifies_and_captions(target, example):
    out, report = example.export(target)
    check_verified(report, target)
    # The artifact, loaded alone in the runtime, captions the held-out sample exactly as the PyTorch model does.
    model = load_model(example.model_dir)
    sample = json.loads((example.model_dir / "sample.json").read_text())
    pixel_values = load_pixel_values(example.model_dir / "sample.png", example.model_dir, model.config)
    tokenizer = require_tokenizer(out, model.config)
    prompt = tokenizer.prompt((example.model_dir / "prompt.txt").read_text().strip(), with_image=True)
    runner = get_target(target).runner(out, report["max_seq_len"])
    tokens, _ = greedy_generate(runner, prompt.ids, pixel_values, 64, prompt.special)
    ref_tokens, _ = greedy_generate(EagerRunner(model, report["max_seq_len"]), prompt.ids, pixel_values, 64,
                                    prompt.special)
    assert tokens == ref_tokens
    assert tokens[-1] in prompt.special.eos
    caption = tokenizer.decode(tokens)
    assert caption == sample["caption"]
    assert sample["color"] in caption and sample["shape"] in caption and sample["position"] in caption


@per_target
def test_reexport_is_byte_identical(target, example, export_cli, tmp_path):
    """The same model exported again (without the numerics check, which must not change the artifact) gives the
    same files, byte for byte, and the same report apart from how the run went."""
    first, report = example.export(target)
    second = tmp_path / "again"
    again = export_cli(target, example.model_dir, second, "--no-verify")
    def files(folder):   # every file, inside an artifact folder (a Core ML package) too
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "report.json")

    assert files(first) == files(second)
    assert {a["path"] for a in report["artifacts"]} <= {name.split("/")[0] for name in files(first)}
    for name in files(first):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for key in WRITTEN:
        assert report[key] == again[key], key


@per_target
@pytest.mark.parametrize("shared", ["example", "odd"])
def test_storage_figure_is_the_artifacts(target, shared, request):
    """report.json's routed-expert bytes are what the saved artifact holds (read back from its files alone), for
    every routed weight of the model, at 2 bits each plus scales; its artifact sizes are the files' own."""
    model = request.getfixturevalue(shared)
    out, report = model.export(target)
    storage = get_target(target).routed_expert_storage(out)
    assert storage.bytes == report["routed_expert_bytes"]
    assert storage.tensors > 0 and storage.where
    assert report["routed_expert_weights"] == routed_weights(load_model(model.model_dir).config)
    bits = storage.bytes * 8 / report["routed_expert_weights"]
    assert bits == pytest.approx(report["routed_expert_bits_per_weight"], abs=1e-3)
    # 2-bit codes, the rest is scales; at widths that are no multiple of a block the zero-trit padding costs more
    # (onnx: 4.8 bits at 80 x 72, both padded to 96), so the bound above 2 is for the example's widths only
    assert bits >= 2.0
    if shared == "example":
        assert bits <= 2.5
    for a in report["artifacts"]:
        assert artifact_bytes(out / a["path"]) == a["bytes"], a["path"]
    assert report["size"]["artifact_bytes"] == sum(a["bytes"] for a in report["artifacts"]) > storage.bytes


# -- --quantize: post-training quantized full-precision parts ------------------------------------------------------

def _quantized_linears(cfg) -> int:
    """Linears the int8 / int4 presets quantize in the text decoder: q, k, v, o and the three SwiGLU projections
    (shared expert or dense FFN) per layer, plus the output head (tied: its own copy)."""
    return cfg.num_hidden_layers * 7 + 1


@per_target
@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_quantized_example_verifies_captions_and_shrinks(target, spec, example, exported):
    """`--quantize int8 | int4` on the example: every quantized linear and the embedding reach the artifact as the
    target's low-bit ops (the target's quantized_bits), the artifact is verified in its runtime against the
    reference holding the same quantized weights, still captions the sample image, and is smaller; the
    quantization's own effect (quantized vs fp32 reference) is reported apart."""
    out, report = exported(target, example.model_dir, "--quantize", spec)
    _, plain = example.export(target)
    model = load_model(example.model_dir, parse(spec))
    assert report["verify"] == "passed"
    bar = report["tolerance"]["min_sqnr_db"]
    assert bar >= 35.0 and report["tolerance"]["need_identical_greedy"]
    assert bar == get_target(target).tolerance.min_sqnr_db or report["deviations"]   # a lower bar is a declared one
    for program, stats in report["numerics"].items():
        assert stats["sqnr_db"] >= min(bar, stats.get("reference_noise_floor_db", bar)), program
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    quant = report["quantization"]
    assert quant["parts"] == parse(spec).as_dict()["parts"]
    assert quant["quantized_ops"]["text_decoder"] == _quantized_linears(model.config)
    assert quant["quantized_ops"]["token_embedding"] == 1
    effect = quant["effect"]["text_decoder"]
    assert 20.0 < effect["sqnr_db"] < 300.0 and not effect["exact"]   # a real change, measured
    # The artifact, loaded alone, captions the sample as the quantized reference does.
    sample = json.loads((example.model_dir / "sample.json").read_text())
    pixel_values = load_pixel_values(example.model_dir / "sample.png", example.model_dir, model.config)
    tokenizer = require_tokenizer(out, model.config)
    prompt = tokenizer.prompt((example.model_dir / "prompt.txt").read_text().strip(), with_image=True)
    tokens, _ = greedy_generate(get_target(target).runner(out, report["max_seq_len"]), prompt.ids, pixel_values, 48,
                                prompt.special)
    assert tokenizer.decode(tokens) == sample["caption"]
    # Smaller than the export without --quantize by most of the dense weights (int4 also below int8).
    assert report["size"]["artifact_bytes"] < 0.7 * plain["size"]["artifact_bytes"]
    if spec == "int4":
        _, int8 = exported(target, example.model_dir, "--quantize", "int8")
        assert report["size"]["artifact_bytes"] < int8["size"]["artifact_bytes"]


@pytest.mark.parametrize("target", TARGETS)
def test_quantize_spec_errors_are_one_line(target, tmp_path, capsys):
    """A bad --quantize spec is exit 2 in one line naming the entry, before anything is read or written."""
    assert cli.main(["--target", target, str(tmp_path / "model"), "-o", str(tmp_path / "out"),
                     "--quantize", "int4,attn=int3"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "attn='int3'" in err, err
    assert not any(tmp_path.iterdir())


# -- random models: odd widths, top-2 with renormalisation, per-channel scales; the Qwen2-MoE layout ----------------

@per_target
def test_odd_widths_top2_renorm_per_channel(target, odd):
    out, report = odd.export(target)
    check_verified(report, target)
    # the encoders on inputs the export's check did not use
    model = load_model(odd.model_dir)
    runner, ref = get_target(target).runner(out, odd.max_seq_len), EagerRunner(model, odd.max_seq_len)
    gen = torch.Generator().manual_seed(7)
    vc = model.config.vision
    pixels = torch.rand(1, vc.num_channels, vc.image_size, vc.image_size, generator=gen) * 2 - 1
    tokens = torch.randint(0, model.config.vocab_size, (1, 9), generator=gen)
    bar = get_target(target).tolerance.min_sqnr_db
    assert sqnr_db(ref.vision_encoder(pixels), torch.as_tensor(runner.vision_encoder(pixels))) >= bar
    assert sqnr_db(ref.token_embedding(tokens), torch.as_tensor(runner.token_embedding(tokens))) >= bar


def _decoder_check(target, model, runner, ref):
    """step(what, embeds, pos): one text_decoder call on the target's runner and on the reference, logits compared
    against the target's bar; returns the reference's logits."""
    bar = get_target(target).tolerance.min_sqnr_db

    def step(what, x, pos):
        want = ref.text_decoder(x, torch.tensor([pos]))
        got = torch.as_tensor(runner.text_decoder(x, torch.tensor([pos])))
        assert got.shape == want.shape, what
        assert sqnr_db(want, got) >= bar, f"{what}: {sqnr_db(want, got):.1f} dB"
        return want

    return step


def _embeds(ref, model, seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda n: ref.token_embedding(torch.randint(0, model.config.vocab_size, (1, n), generator=gen))


@per_target
def test_kv_cache_prefill_decode_then_a_second_prompt(target, odd):
    """Through the runner's own KV cache: a prefill then decode steps, each call's logits the reference's
    (EagerRunner driven by the same calls); then, on the same loaded runner after reset(), another prompt from
    position 0 gives the reference's logits again."""
    out, _ = odd.export(target)
    model = load_model(odd.model_dir)
    runner, ref = get_target(target).runner(out, odd.max_seq_len), EagerRunner(model, odd.max_seq_len)
    step, embeds = _decoder_check(target, model, runner, ref), _embeds(ref, model, 5)
    runner.reset()
    step("prefill", embeds(7), 0)
    step("decode 1", embeds(1), 7)
    step("decode 2", embeds(1), 8)
    runner.reset()
    ref.reset()
    step("second prompt", embeds(4), 0)
    step("second prompt, decode", embeds(1), 4)


@per_target
def test_kv_cache_reset_empties_the_cache(target, odd):
    """reset() empties the cache (the Runner protocol, targets/base.py): after it, a token at position 3 attends to
    positions 0-2 as never written (zeros, as the reference's fresh cache), not to the previous prompt's keys."""
    out, _ = odd.export(target)
    model = load_model(odd.model_dir)
    runner, ref = get_target(target).runner(out, odd.max_seq_len), EagerRunner(model, odd.max_seq_len)
    step, embeds = _decoder_check(target, model, runner, ref), _embeds(ref, model, 6)
    runner.reset()
    step("prompt", embeds(6), 0)
    x = embeds(1)
    stale = ref.text_decoder(x, torch.tensor([3]))          # what a cache still holding that prompt gives
    runner.reset()
    ref.reset()
    fresh = step("after reset, position 3", x, 3)
    assert sqnr_db(fresh, stale) < get_target(target).tolerance.min_sqnr_db   # the check above can tell them apart


@per_target
def test_qwen2_moe_layout_fused_experts(target, export_cli, tmp_path):
    """A Hugging Face Qwen2-MoE directory (fused 3-D expert tensors, shared expert with its sigmoid gate, top-2 with
    renormalisation, no vision tower). test_hf_layouts.py exports the layouts transformers itself writes."""
    d = tmp_path / "qwen"
    write_qwen2_moe(random_model(random_config(top_k=2, norm_topk_prob=True, shared_expert_gate=True, vision=False),
                                 23), d, True)
    report = export_cli(target, d, tmp_path / "out")
    check_verified(report, target, programs={"token_embedding", "text_decoder"})


# -- the command line -------------------------------------------------------------------------------------------

@per_target
def test_failed_verification_writes_nothing(target, tmp_path, monkeypatch, capsys):
    """A verification forced to fail: exit 3, no output folder, no staging folder left, one line on stderr."""
    d = tmp_path / "model"
    save_model(random_model(random_config(vision=False, layers=1, experts=2), 14), d)
    logs = tmp_path.parent / f"{tmp_path.name}-logs"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))              # where the toolchain log goes
    monkeypatch.setattr(get_target(target).tolerance, "min_sqnr_db", 1000.0)   # an unreachable bar
    assert cli.main(["--target", target, str(d), "-o", str(tmp_path / "out"), "--quiet"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("mote-export: error: numerics check failed") and "no artifact was written" in err


def _foreign_flags():
    """(target, flag, owners) for each command-line flag of another registered target that this target lacks."""
    flags = {t: {o.flag(f) for o in [get_target(t).Options] for f in o.cli_fields()} for t in TARGETS}
    return [pytest.param(t, flag, [o for o in TARGETS if flag in flags[o]], id=f"{t}-{flag}")
            for t in TARGETS for flag in sorted(set().union(*flags.values()) - flags[t])]


@pytest.mark.parametrize("target,flag,owners", _foreign_flags())
def test_flag_of_another_target_is_refused(target, flag, owners, tmp_path, capsys):
    """`mote-export --target android --portable` is refused (exit 2) in one line naming the target it belongs to,
    not silently ignored; nothing is read or written."""
    assert cli.main(["--target", target, str(tmp_path / "model"), "-o", str(tmp_path / "out"), flag]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert flag in err and f"not of --target {target}" in err
    assert all(f"--target {o}" in err for o in owners)
    assert not any(tmp_path.iterdir())
