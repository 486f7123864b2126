"""The host build of the three programs in `tvm.relax.VirtualMachine` (what the export verifies with): the
architecture-independent core of device_runner.py on the host's libraries, with the Runner protocol's torch
tensors."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

from mote.export.errors import InputError

from .build import HOST
from .device_runner import VmPrograms


def check_host() -> None:
    """The host build is x86-64-v3 (AVX2): on another machine it cannot load or would stop on an illegal
    instruction, so say so in one line (exit 2)."""
    cpuinfo = Path("/proc/cpuinfo")
    avx2 = " avx2" in cpuinfo.read_text() if cpuinfo.exists() else False
    if platform.machine() != "x86_64" or not avx2:
        raise InputError(f"tvm: the library this machine runs is the {HOST.description} build; this is a "
                         f"{platform.machine()} machine{'' if avx2 else ' without AVX2'}: export with --no-verify "
                         "here, or on an x86-64 machine with AVX2")


class VmRunner(VmPrograms):
    def __init__(self, out_dir: Path, max_seq_len: int, threads: int | None = None):
        super().__init__(out_dir, HOST.name, max_seq_len, threads)

    def vision_encoder(self, pixel_values):
        return torch.from_numpy(super().vision_encoder(pixel_values.numpy()))

    def token_embedding(self, tokens):
        return torch.from_numpy(super().token_embedding(tokens.numpy()))

    def text_decoder(self, embeds, input_pos):
        return torch.from_numpy(super().text_decoder(embeds.numpy(), input_pos.numpy()))
