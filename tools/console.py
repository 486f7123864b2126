"""What the command-line tools show: our own lines only, the toolchains' chatter kept aside.

- `captured_toolchain_output()`: file descriptors 1 and 2 go to a temporary file while the toolchains run, so the
  lines printed by C++ (ExecuTorch's cpuinfo), by extension loaders (torchao's CUDA kernels), by `warnings` and by
  libraries' loggers are kept out of the terminal. Our own lines go to duplicates of the original descriptors.
  With `-v` nothing is captured; on failure the capture is saved to a log file the error line names.
- `Console`: `logging` for our lines (`-v` debug, default info, `-q` warnings and errors only) and progress within
  long steps, a tqdm bar when stderr is a terminal, one line per program otherwise.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile

LOGGER = "mote"


def _real_stream(stream, fd: int):
    """True when `stream` writes to the process's descriptor `fd` (not pytest's capture or a StringIO)."""
    try:
        return stream.fileno() == fd
    except (AttributeError, io.UnsupportedOperation, ValueError):
        return False


class ToolchainCapture:
    """fds 1 and 2 -> a temporary file; `stdout` / `stderr` write to the original destinations meanwhile."""

    def __init__(self):
        self.text = ""
        self.stdout, self.stderr = sys.stdout, sys.stderr

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        # Our streams: over the saved descriptors when sys.stdout / sys.stderr are the process's own; otherwise
        # (under pytest's capsys, or a caller's redirect) the Python-level streams, which fd redirection leaves alone.
        if _real_stream(sys.stdout, 1):
            self.stdout = open(self._saved[1], "w", buffering=1, closefd=False)
        if _real_stream(sys.stderr, 2):
            self.stderr = open(self._saved[2], "w", buffering=1, closefd=False)
        for fd in (1, 2):
            os.dup2(self._file.fileno(), fd)
        return self

    def __exit__(self, *exc):
        for stream in (sys.stdout, sys.stderr, self.stdout, self.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.stdout, self.stderr = sys.stdout, sys.stderr   # the descriptors are the original ones again
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False

    def save(self, prog: str) -> str | None:
        """Write what was captured to a log file (for an error line to name); None when there was nothing."""
        if not self.text.strip():
            return None
        fd, path = tempfile.mkstemp(prefix=f"{prog}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(self.text)
        return path


class _NoCapture:
    text = ""

    def __init__(self):
        self.stdout, self.stderr = sys.stdout, sys.stderr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def save(self, prog: str) -> None:
        return None


def captured_toolchain_output(enabled: bool):
    return ToolchainCapture() if enabled else _NoCapture()


class Console:
    """Our lines through `logging` (logger "mote"), and a progress sink for `export.progress`."""

    def __init__(self, prog: str, verbosity: int, stdout, stderr):
        self.prog, self.verbosity = prog, verbosity
        self.stdout, self.stderr = stdout, stderr
        self.logger = logging.getLogger(LOGGER)
        self.logger.handlers.clear()
        handler = logging.StreamHandler(stdout)
        handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
        self.logger.addHandler(handler)
        self.logger.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
        self.logger.propagate = False
        self.terminal = verbosity >= 0 and _isatty(stderr)
        self._bar = None
        self._last_group = None

    def info(self, msg: str) -> None:
        self.logger.info(msg)

    def progress(self, label: str, done: int, total: int) -> None:
        """The `export.progress` sink: a bar on a terminal; else a line each time the program worked on changes."""
        if self.terminal:
            from tqdm import tqdm

            if self._bar is None or self._bar.total != total:
                self.close_bar()
                self._bar = tqdm(total=total, file=self.stderr, leave=False, dynamic_ncols=True,
                                 desc=f"{self.prog}:   {label}",
                                 bar_format="{desc} |{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
            self._bar.set_description_str(f"{self.prog}:   {label}", refresh=False)
            self._bar.update(done - self._bar.n)
            return
        group = label.split(":")[0]
        if group != self._last_group and done < total:
            self._last_group = group
            self.logger.info(f"  {label}")
        elif self.verbosity > 0:
            self.logger.debug(f"  {label} ({done}/{total})")

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._last_group = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
