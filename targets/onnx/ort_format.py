"""Byte-stable ORT format files: the converter's kernel-type-string resolver, rewritten in a fixed order.

onnxruntime's `.ort` writer builds the model first and the `KernelTypeStrResolver` last. The resolver's entries come
from an absl hash map whose iteration order depends on the map's heap address, so the same model converted twice
gives differently placed (equally valid) resolver tables: the entry *vector* is sorted by op id, but the tables it
points to are written in hash order. Everything else in the file is written in graph order.

`write_canonical_ort` keeps the model's bytes as written (they are the tail of the buffer, at the same distance from its
end, so every relative offset and alignment inside stays valid) and rebuilds what was written after it, the resolver
and the root table, in vector order:

    before:  [root][session][resolver tables in hash order][model ...]
    after:   [root][session][resolver tables in op-id order][model ...]   (model bytes unchanged)
"""
from __future__ import annotations

import mmap
import shutil
import struct
from pathlib import Path

import flatbuffers

import onnxruntime.tools.ort_format_model  # noqa: F401  (puts the generated `ort_flatbuffers_py` on sys.path)
from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs import (
    ArgTypeAndIndex, InferenceSession, KernelTypeStrArgsEntry, KernelTypeStrResolver, OpIdKernelTypeStrArgsEntry,
)

FILE_IDENTIFIER = b"ORTM"
_SESSION_STATE_SLOT = 8   # InferenceSession.session_state: deprecated; the converter no longer writes it


def _resolver_entries(resolver) -> list[tuple[str, list[tuple[str, list[tuple[int, int]]]]]]:
    """(op_id, [(kernel_type_str, [(arg_type, index)])]) in the file's vector order (the writer sorts by key)."""
    entries = []
    for i in range(resolver.OpKernelTypeStrArgsLength()):
        op = resolver.OpKernelTypeStrArgs(i)
        per_type = []
        for j in range(op.KernelTypeStrArgsLength()):
            entry = op.KernelTypeStrArgs(j)
            args = [(entry.Args(k).ArgType(), entry.Args(k).Index()) for k in range(entry.ArgsLength())]
            per_type.append((entry.KernelTypeStr().decode(), args))
        entries.append((op.OpId().decode(), per_type))
    return entries


def _build_resolver(builder: flatbuffers.Builder, entries) -> int:
    op_tables = []
    for op_id, per_type in entries:
        type_tables = []
        for kernel_type_str, args in per_type:
            arg_tables = []
            for arg_type, index in args:
                ArgTypeAndIndex.Start(builder)
                ArgTypeAndIndex.AddArgType(builder, arg_type)
                ArgTypeAndIndex.AddIndex(builder, index)
                arg_tables.append(ArgTypeAndIndex.End(builder))
            args_vector = _offset_vector(builder, KernelTypeStrArgsEntry.StartArgsVector, arg_tables)
            name = builder.CreateString(kernel_type_str)
            KernelTypeStrArgsEntry.Start(builder)
            KernelTypeStrArgsEntry.AddKernelTypeStr(builder, name)
            KernelTypeStrArgsEntry.AddArgs(builder, args_vector)
            type_tables.append(KernelTypeStrArgsEntry.End(builder))
        types_vector = _offset_vector(builder, OpIdKernelTypeStrArgsEntry.StartKernelTypeStrArgsVector, type_tables)
        name = builder.CreateString(op_id)
        OpIdKernelTypeStrArgsEntry.Start(builder)
        OpIdKernelTypeStrArgsEntry.AddOpId(builder, name)
        OpIdKernelTypeStrArgsEntry.AddKernelTypeStrArgs(builder, types_vector)
        op_tables.append(OpIdKernelTypeStrArgsEntry.End(builder))
    ops_vector = _offset_vector(builder, KernelTypeStrResolver.StartOpKernelTypeStrArgsVector, op_tables)
    KernelTypeStrResolver.Start(builder)
    KernelTypeStrResolver.AddOpKernelTypeStrArgs(builder, ops_vector)
    return KernelTypeStrResolver.End(builder)


def _offset_vector(builder: flatbuffers.Builder, start, offsets: list[int]) -> int:
    start(builder, len(offsets))
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()


def _model_and_resolver(buf):
    """(model table position, resolver entries, ort version) of an ORT format buffer."""
    if bytes(buf[4:8]) != FILE_IDENTIFIER:
        raise ValueError("not an ORT format model (no ORTM identifier)")
    session = InferenceSession.InferenceSession.GetRootAs(buf, 0)
    if session._tab.Offset(_SESSION_STATE_SLOT) != 0:
        raise ValueError("ORT format model with a (deprecated) session state: not rewritten")
    return session.Model()._tab.Pos, _resolver_entries(session.KernelTypeStrResolver()), session.OrtVersion()


def _canonical_head(buf, model_pos: int, entries, version: bytes) -> tuple[bytes, int]:
    """(new head, tail_start): the file's bytes from tail_start on, kept as they are, follow the new head."""
    model_vtable = model_pos - struct.unpack_from("<i", buf, model_pos)[0]
    # The model table was written after its children (higher addresses) and just after its own vtable (if new), so
    # the model's bytes start here; everything before it was written after the model.
    tail_start = min(model_pos, model_vtable)
    tail_len = len(buf) - tail_start
    # Offsets in a builder count from the buffer's end. The head is built over a stand-in tail of the same length
    # modulo 8 (so every alignment is the real one), with the model at the stand-in's start; the one offset into
    # the tail, session.model, is then moved to the real model table.
    stand_in = tail_len % 8 + 8
    builder = flatbuffers.Builder(64 * 1024)
    builder.Pad(stand_in)
    builder.minalign = 8
    resolver = _build_resolver(builder, entries)
    version = builder.CreateString(version)
    InferenceSession.Start(builder)
    InferenceSession.AddOrtVersion(builder, version)
    InferenceSession.AddModel(builder, stand_in)
    InferenceSession.AddKernelTypeStrResolver(builder, resolver)
    builder.Finish(InferenceSession.End(builder), file_identifier=FILE_IDENTIFIER)
    head = bytearray(builder.Output()[:-stand_in])
    session = InferenceSession.InferenceSession.GetRootAs(head, 0)
    model_field = session._tab.Pos + session._tab.Offset(6)
    to_stand_in = struct.unpack_from("<I", head, model_field)[0]
    struct.pack_into("<I", head, model_field, to_stand_in + (model_pos - tail_start))
    return bytes(head), tail_start


def write_canonical_ort(source: Path, target: Path) -> None:
    """`source`, an ORT format model, written to `target` with its resolver in vector order (module docstring).
    Streams the model's bytes: a .ort can be close to 2 GiB."""
    with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model_pos, entries, version = _model_and_resolver(buf)
        head, tail_start = _canonical_head(buf, model_pos, entries, version)
        with open(target, "wb") as out:
            out.write(head)
            f.seek(tail_start)
            shutil.copyfileobj(f, out, 16 << 20)
    # The rewrite moved no model byte and lost no resolver entry.
    with open(target, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        new_model_pos, written, _ = _model_and_resolver(buf)
    if new_model_pos - len(head) != model_pos - tail_start or written != entries:
        raise RuntimeError(f"onnx: rewriting {target.name} changed its model (has the ORT format changed?)")
