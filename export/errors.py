"""Errors that map onto the exit codes of DESIGN.md section 7."""


class MoteError(Exception):
    """Base class: `exit_code` is what the command line returns; str(error) is the one line it prints."""

    exit_code = 1


class InputError(MoteError):
    """Bad input or usage: a file or tensor the user gave is wrong. Exit code 2."""

    exit_code = 2


class PipelineError(MoteError):
    """The graph passes did not produce what the targets are built on (e.g. a MoE block left unfused). Exit code 1."""

    exit_code = 1


class VerificationError(MoteError):
    """The lowered artifact does not match the PyTorch reference. Exit code 3."""

    exit_code = 3
