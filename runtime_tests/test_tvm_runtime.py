"""`--target tvm`'s own checks, beside the registry suite (test_targets.py): what the files are (libraries per
architecture, the params file, the manifest), that the manifest alone says how to call a program, that the KV cache
is updated in place, that a decode step reads only the chosen experts, the aarch64 instructions, the command
line's refusals, and `--quantize int4` / `int8`: verified at the fp32 bar, the params holding the model's quantized
values in 4 / 8 bits per weight and no float copy of them."""
import collections
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mote.export.generate import EagerRunner
from mote.export.loader import load_model
from mote.export.model import QuantizedLinear
from mote.export.quantization import parse
from mote.export.verify import sqnr_db
from mote.tools import cli

ELF_X86_64, ELF_AARCH64 = 62, 183
PROGRAMS = ("vision_encoder", "token_embedding", "text_decoder")


def elf_machine(path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", path
    return int.from_bytes(head[18:20], "little")


def test_libraries_per_architecture_and_weights_once(example):
    """Each program is a host (x86-64) and an aarch64 shared library, read back from their ELF headers, plus one
    params file that both use: the params hold every weight the manifest names, and no library holds weights
    (the bytes of each program's largest weight appear in no library)."""
    out, report = example.export("tvm")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["programs"]) == set(PROGRAMS)
    for name, entry in manifest["programs"].items():
        assert elf_machine(out / f"{name}.x86_64.so") == ELF_X86_64
        assert elf_machine(out / f"{name}.aarch64.so") == ELF_AARCH64
        with safe_open(str(out / entry["params_file"]), framework="numpy") as f:
            assert sorted(f.keys()) == sorted(entry["weights"])
            largest = max(entry["weights"], key=lambda w: f.get_tensor(w).nbytes)
            needle = f.get_tensor(largest).tobytes()[:256]
        for arch in ("x86_64", "aarch64"):
            assert needle not in (out / f"{name}.{arch}.so").read_bytes(), (name, arch)
    assert {a["path"] for a in report["artifacts"]} >= {f"{p}.{a}.so" for p in PROGRAMS for a in ("x86_64", "aarch64")}
    assert any("glibc (linux) builds" in n for n in report["notes"])   # no TVM_NDK_CC here: said so


def _call_from_manifest(out, name, feeds):
    """Call a program as an app would: the library, then the inputs in the manifest's order and its weights."""
    import tvm
    from tvm import relax

    entry = json.loads((out / "manifest.json").read_text())["programs"][name]
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / f"{name}.x86_64.so")), tvm.cpu())
    with safe_open(str(out / entry["params_file"]), framework="numpy") as f:
        weights = [tvm.runtime.tensor(f.get_tensor(w)) for w in entry["weights"]]
    args = [feeds[i["name"]] for i in entry["inputs"]]
    return entry, vm["main"](*args, *weights), args


def test_manifest_says_how_to_call_the_decoder_and_the_cache_is_updated_in_place(example):
    """The decoder called from the manifest alone (not through our runner): a prefill of 3 tokens gives the
    reference's logits, and the cache tensors passed in are the ones written, at positions 0-2 only."""
    import tvm

    out, report = example.export("tvm")
    model = load_model(example.model_dir)
    entry = json.loads((out / "manifest.json").read_text())["programs"]["text_decoder"]
    ref = EagerRunner(model, report["max_seq_len"])
    embeds = ref.token_embedding(torch.tensor([[5, 9, 200]]))
    want = ref.text_decoder(embeds, torch.tensor([0]))
    shapes = {i["name"]: i for i in entry["inputs"]}
    feeds = {"embeds": tvm.runtime.tensor(embeds.numpy()), "input_pos": tvm.runtime.tensor(np.array([0]))}
    for cache in entry["kv_cache"]["inputs"]:
        feeds[cache] = tvm.runtime.tensor(np.zeros(shapes[cache]["shape"], dtype=shapes[cache]["dtype"]))
    assert entry["T"] == [1, report["max_seq_len"]]
    _, outputs, args = _call_from_manifest(out, "text_decoder", feeds)
    assert sqnr_db(want, torch.from_numpy(outputs[0].numpy())) >= 60
    for i, cache in enumerate(entry["kv_cache"]["inputs"]):
        written = feeds[cache].numpy()                      # the caller's own tensor, after the call
        assert np.abs(written[:, :, :3]).max() > 0 and not written[:, :, 3:].any(), cache
        assert np.array_equal(outputs[1 + i].numpy(), written), cache


def test_a_decode_step_reads_only_the_chosen_experts(example, tmp_path):
    """The routed-experts kernel takes the router's top-k indices: with every expert the reference's router did not
    choose for this token poisoned (NaN scales, in a copy of the params file), the decode step's logits are still
    the reference's."""
    out, report = example.export("tvm")
    model = load_model(example.model_dir)
    chosen = {}

    def capture(layer):
        def hook(module, args, logits):
            chosen[layer] = set(torch.topk(logits.reshape(-1, logits.shape[-1]), model.config.moe.top_k)
                                .indices.flatten().tolist())
        return hook

    ref = EagerRunner(model, report["max_seq_len"])
    x = ref.token_embedding(torch.tensor([[42]]))
    handles = [model.model.layers[i].mlp.gate.register_forward_hook(capture(i)) for i in model.config.moe.moe_layers]
    want = ref.text_decoder(x, torch.tensor([0]))
    for h in handles:
        h.remove()
    poisoned = tmp_path / "poisoned"
    shutil.copytree(out, poisoned)
    entry = json.loads((out / "manifest.json").read_text())["programs"]["text_decoder"]
    from mote.export.tensor_file import write_safetensors

    with safe_open(str(out / entry["params_file"]), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    unchosen = 0
    for name in entry["routed_expert_weights"]:
        if name.endswith("_scale"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            for e in set(range(model.config.moe.num_experts)) - chosen[layer]:
                tensors[name][e] = math.nan
                unchosen += 1
    assert unchosen > 0
    write_safetensors(poisoned / entry["params_file"], [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()],
                      tensors.__getitem__)
    from mote.targets import get_target

    runner = get_target("tvm").runner(poisoned, report["max_seq_len"])
    got = runner.text_decoder(x, torch.tensor([0]))
    assert torch.isfinite(got).all()
    assert sqnr_db(want, got) >= 60


def _objdump(path) -> str:
    tool = shutil.which("aarch64-linux-gnu-objdump")
    if tool is None:
        pytest.skip("aarch64-linux-gnu-objdump is missing (Debian binutils-aarch64-linux-gnu, with the cross gcc)")
    return subprocess.run([tool, "-d", str(path)], capture_output=True, text=True, check=True).stdout


def test_aarch64_instructions_follow_tvm_arch(example, export_cli, tmp_path):
    """The default aarch64 build (armv8.2-a+dotprod) runs the ternary kernels on sdot; `--tvm-arch armv8-a` builds
    for cores without it: no sdot anywhere in its decoder, NEON's widening multiply-accumulates instead."""
    out, _ = example.export("tvm")
    assert re.search(r"\bsdot\b", _objdump(out / "text_decoder.aarch64.so"))
    base = tmp_path / "armv8"
    report = export_cli("tvm", example.model_dir, base, "--tvm-arch", "armv8-a", "--no-verify")
    asm = _objdump(base / "text_decoder.aarch64.so")
    assert not re.search(r"\bsdot\b", asm)
    assert re.search(r"\bsmlal2?\b", asm)   # the ternary dot products as widening NEON multiply-accumulates
    assert report["facts"]["architectures"]["aarch64"]["llvm_target"] == {"mattr": ["+neon"]}


def _refused(argv, capsys, tmp_path) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def test_unknown_tvm_arch_is_refused(tmp_path, capsys, example):
    err = _refused(["--target", "tvm", str(example.model_dir), "-o", str(tmp_path / "out"), "--tvm-arch", "armv9"],
                   capsys, tmp_path)
    assert "--tvm-arch" in err and "armv8.2-a+dotprod" in err and "armv8-a" in err


def test_missing_cross_compiler_is_refused(tmp_path, capsys, example, monkeypatch):
    """No aarch64-linux-gnu-gcc on PATH: exit 2, one line naming the compiler and the Debian package, nothing
    written."""
    from mote.targets.tvm import build

    real = shutil.which
    monkeypatch.setattr(build.shutil, "which", lambda cmd: None if cmd.startswith("aarch64") else real(cmd))
    err = _refused(["--target", "tvm", str(example.model_dir), "-o", str(tmp_path / "out")], capsys, tmp_path)
    assert "aarch64-linux-gnu-gcc" in err and "gcc-aarch64-linux-gnu" in err


def test_tvm_ndk_cc_that_is_no_compiler_is_refused(tmp_path, capsys, example, monkeypatch):
    monkeypatch.setenv("TVM_NDK_CC", str(tmp_path / "no-such-clang"))
    err = _refused(["--target", "tvm", str(example.model_dir), "-o", str(tmp_path / "out")], capsys, tmp_path)
    assert "TVM_NDK_CC" in err and "no-such-clang" in err


# -- --quantize --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized(request, example):
    """(spec, out_dir, report) of the example exported with --quantize int4 / int8 (verified by the export)."""
    out, report = example.exported("tvm", example.model_dir, "--quantize", request.param)
    return request.param, out, report


def test_quantized_export_verifies_at_the_fp32_bar(quantized):
    """Weight-only dequantization in our kernels keeps the reference's semantics: every program at >= 60 dB against
    the reference holding the same quantized weights, 32/32 greedy tokens, no deviation declared."""
    _, _, report = quantized
    assert report["verify"] == "passed" and report["deviations"] == []
    assert report["tolerance"]["min_sqnr_db"] == 60
    for name in PROGRAMS:
        assert report["numerics"][name]["sqnr_db"] >= 60, name
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"


def unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """int4 weights stored two per byte: per span of 32 weights (16 bytes), byte j holds weight j in its low nibble
    and weight 16 + j in its high one, two's complement (the layout targets/tvm/kernels.pack_int4 documents)."""
    nibbles = [(packed & 0xF).astype(np.int16), (packed >> 4).astype(np.int16)]
    low, high = ((n - 16 * (n > 7)).reshape(*packed.shape[:-1], -1, 16) for n in nibbles)
    return np.concatenate([low, high], axis=-1).reshape(*packed.shape[:-1], -1)[..., :k]


def stored_tensors(out) -> dict:
    """{params file: {tensor name: numpy array}} (a tied weight may be in two programs' files)."""
    files = {}
    for entry in json.loads((out / "manifest.json").read_text())["programs"].values():
        with safe_open(str(out / entry["params_file"]), framework="numpy") as f:
            files[entry["params_file"]] = {k: f.get_tensor(k) for k in f.keys()}
    return files


def data_bytes(files: dict) -> dict:
    """{params file: bytes of its tensors' data}."""
    return {file: sum(a.nbytes for a in tensors.values()) for file, tensors in files.items()}


def test_params_hold_the_quantized_values_in_their_bits(quantized, example):
    """Every module the spec quantizes (the reference model loaded with it) is stored as its own values, int8 one per
    byte or int4 two per byte (decoded here), beside its float32 scales, in the params of the program that reads it;
    no float copy of its weight is stored anywhere; each params file holds fewer bytes of data than the unquantized
    export's by exactly the fp32 weights replaced minus those bytes; the report's byte counts are the files'."""
    spec, out, report = quantized
    model = load_model(example.model_dir, parse(spec))
    modules = {f"model.{n}": m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert {m.bits for m in modules.values()} == ({4, 8} if spec == "int4" else {8})
    files = stored_tensors(out)
    saved = collections.Counter()       # params file -> fp32 bytes of the weights replaced - the quantized bytes
    value_bytes = collections.Counter()
    for name, module in modules.items():
        rows, k = module.qweight.shape
        assert not any(f"{name}.weight" in tensors for tensors in files.values()), name
        (file,) = [file for file, tensors in files.items() if f"{name}.qscale" in tensors]
        tensors = files[file]
        assert np.array_equal(tensors[f"{name}.qscale"], module.qscale.numpy()), name
        if module.bits == 8:
            values = tensors[f"{name}.qweight"]
            assert values.dtype == np.int8 and np.array_equal(values, module.qweight.numpy()), name
        else:
            values = tensors[f"{name}.qweight.kernel_layout"]
            assert values.dtype == np.uint8 and values.shape == (rows, -(-k // 32) * 16), name
            assert np.array_equal(unpack_nibbles(values, k), module.qweight.numpy()), name
        value_bytes[f"int{module.bits}"] += values.nbytes
        saved[file] += rows * k * 4 - values.nbytes - tensors[f"{name}.qscale"].nbytes
    assert value_bytes == {kind: q["value_bytes"] for kind, q in report["facts"]["quantized"].items()}
    fp32_out, _ = example.export("tvm")
    fp32_bytes, quantized_bytes = data_bytes(stored_tensors(fp32_out)), data_bytes(files)
    for file, fewer in saved.items():
        assert fp32_bytes[file] - quantized_bytes[file] == fewer, file


def test_quantized_kernels_in_both_builds(quantized):
    """The decoder's host and aarch64 libraries both hold our quantized-linear kernels of the spec's bit widths (the
    lm_head's int8 one in either preset), the aarch64 ones dequantizing with NEON conversions."""
    spec, out, report = quantized
    kinds = {"int4": ("int4", "int8"), "int8": ("int8",)}[spec]
    for kind in kinds:
        assert any(k.startswith(f"mote_quantized_linear_{kind}") for k in report["facts"]["quantized"][kind]["kernels"])
    asm = _objdump(out / "text_decoder.aarch64.so")
    for kind in kinds:
        assert re.search(rf"<__tvm_ffi_mote_quantized_linear_{kind}_\w+>:", asm), kind
    assert re.search(r"\bscvtf\s+v\d+\.4s", asm)
    host = (out / "text_decoder.x86_64.so").read_bytes()
    for kind in kinds:
        assert f"mote_quantized_linear_{kind}".encode() in host, kind
