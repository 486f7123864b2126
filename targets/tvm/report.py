"""What report.json says about a TVM export, read back from the written files: the manifest, the libraries' ELF
headers (which architecture each one is really for) and the params files' safetensors headers (the bytes the routed
experts and the quantized weights of --quantize take)."""
from __future__ import annotations

import json
from pathlib import Path

from mote.export.tensor_file import read_header

from .build import HOST

MANIFEST = "manifest.json"
ELF_MACHINES = {62: "x86-64", 183: "AArch64"}


def library_path(out_dir: Path, program: str, arch: str) -> Path:
    return Path(out_dir) / f"{program}.{arch}.so"


def params_path(out_dir: Path, program: str) -> Path:
    return Path(out_dir) / f"{program}.safetensors"


def load_manifest(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def elf_machine(path: Path) -> int | None:
    """e_machine of an ELF file (None if it is not one)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def libc(path: Path) -> str:
    """The C library a shared library was linked against, from the names it needs: glibc's libc.so.6, or Android's
    bionic libc.so."""
    data = path.read_bytes()
    return "glibc" if b"libc.so.6\x00" in data else "bionic" if b"libc.so\x00" in data else "none"


def tensor_bytes(header: dict, names: list[str]) -> int:
    return sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)


def routed_expert_bytes(out_dir: Path) -> dict:
    """The routed experts' codes and scales, by the manifest's names, sized from the params files' headers."""
    manifest = load_manifest(out_dir)
    total, tensors, where, dtypes = 0, 0, [], set()
    for name, entry in manifest["programs"].items():
        names = entry["routed_expert_weights"]
        if names:
            header = read_header(Path(out_dir) / entry["params_file"])
            total += tensor_bytes(header, names)
            tensors += len(names)
            where.append(entry["params_file"])
            dtypes |= {header[n]["dtype"] for n in names}
    return {"bytes": total, "tensors": tensors, "where": ", ".join(where), "dtypes": sorted(dtypes)}


def quantized_weights(out_dir: Path) -> dict:
    """The quantized matrices the manifest names (the operands of the quantized kernels), by bit width: how many,
    their weights, the bytes of their stored values and scales (from the params files' headers), the stored dtypes,
    the scale groups ("channel": one per output row), where, and the kernels that read them with their calls (summed
    over the programs: a shape's kernel is compiled into each program's library that calls it)."""
    out: dict = {}

    def kind(bits: int) -> dict:
        return out.setdefault(f"int{bits}", {"matrices": 0, "weights": 0, "value_bytes": 0, "scale_bytes": 0,
                                             "value_dtypes": [], "groups": [], "files": [], "kernels": {}})

    for entry in load_manifest(out_dir)["programs"].values():
        matrices = entry.get("quantized_weights", [])
        header = read_header(Path(out_dir) / entry["params_file"]) if matrices else {}
        for w in matrices:
            found = kind(w["bits"])
            found["matrices"] += 1
            found["weights"] += w["rows"] * w["k"]
            found["value_bytes"] += tensor_bytes(header, [w["q"]])
            found["scale_bytes"] += tensor_bytes(header, [w["scale"]])
            for key, value in (("value_dtypes", header[w["q"]]["dtype"]), ("files", entry["params_file"]),
                               ("groups", "channel" if w["group"] == w["k"] else w["group"])):
                if value not in found[key]:
                    found[key].append(value)
        for kernel, bits in {(w["kernel"], w["bits"]) for w in matrices}:
            calls = kind(bits)["kernels"]
            calls[kernel] = calls.get(kernel, 0) + entry["kernels"][kernel]
    return out


def read_back(out_dir: Path) -> dict:
    out_dir = Path(out_dir)
    manifest = load_manifest(out_dir)
    facts: dict = {"architectures": manifest["architectures"], "libraries": {}, "params": {}, "programs": {}}
    files = []
    for name, entry in manifest["programs"].items():
        for arch in manifest["architectures"]:
            path = library_path(out_dir, name, arch)
            machine = elf_machine(path)
            facts["libraries"][path.name] = {"architecture": arch, "elf_machine": ELF_MACHINES.get(machine, machine),
                                             "libc": libc(path), "bytes": path.stat().st_size}
            files.append(path.name)
        header = read_header(out_dir / entry["params_file"])
        names = [k for k in header if k != "__metadata__"]
        facts["params"][entry["params_file"]] = {"tensors": len(names), "bytes": tensor_bytes(header, names)}
        files.append(entry["params_file"])
        facts["programs"][name] = {"kernels": entry["kernels"],
                                   "matmuls_left_to_tvm": entry["relax_ops"].get("relax.matmul", 0),
                                   "T": entry.get("T"), "kv_cache": entry.get("kv_cache")}
    facts["files"] = sorted(files)
    facts["routed_experts"] = routed_expert_bytes(out_dir)
    facts["quantized"] = quantized_weights(out_dir)
    facts["android"] = "android-arm64" in manifest["architectures"]
    return facts


def render_notes(facts: dict, weights: int) -> list[str]:
    routed = facts["routed_experts"]
    decoder = facts["programs"]["text_decoder"]
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(decoder["kernels"].items()))
    notes = []
    if routed["tensors"]:
        stored = ("2-bit codes (uint8, four per byte) and float32 scales" if "U8" in routed["dtypes"]
                  else f"{'/'.join(routed['dtypes'])} weights")
        notes.append(f"routed experts: {routed['tensors']} tensors, {routed['bytes']} bytes in {routed['where']} for "
                     f"{weights} weights ({routed['bytes'] * 8 / max(weights, 1):.3f} bits/weight): {stored}, passed "
                     "to a routed-experts kernel that takes the router's top-k indices and reads only the chosen "
                     "experts")
    notes += [_quantized_note(kind, q) for kind, q in sorted(facts["quantized"].items())]
    notes.append(f"text_decoder kernels (ours, TensorIR): {kernels}; matmuls left to TVM's default lowering: "
                 f"{decoder['matmuls_left_to_tvm']}")
    if decoder["T"]:
        notes.append(f"text_decoder: one program for prefill and decode, T in [{decoder['T'][0]}, {decoder['T'][1]}]; "
                     f"KV cache as {len(decoder['kv_cache']['inputs'])} arguments updated in place")
    for file, lib in sorted(facts["libraries"].items()):
        arch = facts["architectures"][lib["architecture"]]
        runs = ("the build mote-export and mote-run load (relax.VirtualMachine)" if lib["architecture"] == HOST.name
                else "not run here")
        notes.append(f"{file}: ELF {lib['elf_machine']}, {lib['libc']}, {arch['description']}; {runs}")
    phone = [lib for lib in facts["libraries"].values() if lib["elf_machine"] == "AArch64"]
    if phone and all(lib["libc"] == "glibc" for lib in phone):
        notes.append("the aarch64 libraries are glibc (linux) builds; set TVM_NDK_CC to an Android NDK clang "
                     "(e.g. aarch64-linux-android28-clang) to also build Android ones")
    return notes


def _quantized_note(kind: str, q: dict) -> str:
    values = "/".join(d.lower().replace("u8", "uint8").replace("i8", "int8") for d in q["value_dtypes"])
    per_byte = q["weights"] / max(q["value_bytes"], 1)
    groups = ", ".join("one per output channel" if g == "channel" else f"one per {g} weights" for g in q["groups"])
    calls = sum(q["kernels"].values())
    return (f"{kind} weights (--quantize): {q['matrices']} matrices, {q['weights']} weights in {q['value_bytes']} "
            f"bytes of {values} ({per_byte:.2f} per byte, {q['value_bytes'] * 8 / max(q['weights'], 1):.3f} "
            f"bits/weight) + {q['scale_bytes']} bytes of float32 scales ({groups}) in {', '.join(q['files'])}; "
            f"dequantized in the inner loop of our kernels, {len(q['kernels'])} shapes, {calls} calls "
            f"({', '.join(sorted(q['kernels']))})")


def render_deviations(facts: dict) -> list[str]:
    """None to declare: every kernel keeps the reference semantics (fp32, integer-exact ternary dot products, the
    reference's per-token int8 rounding, weight-only dequantization of quantized weights with fp32 activations;
    tests/test_tvm_kernels.py), whatever the export (`facts` unused)."""
    return []
