"""Where `mote-export` writes: checks before any work, a hidden staging folder, and one atomic rename at the end.

Rules (a tool never deletes what it did not write):
- `-o` naming a file: refused (exit 2);
- a missing or empty folder: written;
- a previous mote-export output (a `report.json` of ours listing its files) holding nothing else: replaced whole;
- any other non-empty folder: refused (exit 2) unless `--overwrite`; then our files are written into it, replacing
  same-named files and a previous output's listed files, and everything else in it is left alone.

Work happens in a sibling `.NAME.staging-PID` folder carrying a marker file; only a finished, verified output is
moved into place. A run killed before that (OOM, SIGKILL) leaves only the hidden staging folder, which the next
run into the same place removes once its process is gone (the marker says it is ours).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mote.export.errors import InputError

MARKER = ".mote-export-staging"
REPORT = "report.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # someone else's live process
        return True
    return True


def our_files(out_dir: Path) -> set[str] | None:
    """The files a previous mote-export output in `out_dir` lists (its report's `files`), or None if it is not one."""
    try:
        report = json.loads((out_dir / REPORT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("tool") != "mote-export" or not isinstance(report.get("files"), list):
        return None
    return {str(f) for f in report["files"]}


def _entries(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()}


class OutputDir:
    def __init__(self, out_dir: Path, overwrite: bool = False):
        self.path, self.overwrite = Path(out_dir), overwrite
        self.staging: Path | None = None

    def check(self) -> None:
        """Refuse an output path we must not write into (before any work is done)."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise InputError(f"{p}: exists and is not a directory; give a folder for -o")
        if not p.is_dir() or not any(p.iterdir()):
            return
        ours = our_files(p)
        if ours is not None and _entries(p) <= ours:
            return
        if self.overwrite:
            return
        what = "holds files mote-export did not write" if ours is not None else "is not empty and holds no mote-export output"
        raise InputError(f"{p}: {what}; choose another -o, or pass --overwrite to write our files into it "
                         f"(other files are kept)")

    def remove_stale_staging(self) -> list[Path]:
        """Remove staging folders of earlier runs into the same place whose process is gone."""
        removed = []
        for d in self.path.parent.glob(f".{self.path.name}.staging-*"):
            pid = d.name.rsplit("-", 1)[-1]
            if d.is_dir() and (d / MARKER).is_file() and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed

    def create_staging(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.path.parent / f".{self.path.name}.staging-{os.getpid()}"
        self.staging.mkdir()
        (self.staging / MARKER).write_text("mote-export work in progress; removed by the next run once this process "
                                           "is gone\n")
        return self.staging

    def discard_staging(self) -> None:
        if self.staging is not None and (self.staging / MARKER).is_file():
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None

    def commit(self) -> None:
        """Move the finished staging folder's files into place (see the module docstring for the rules)."""
        staging = self.staging
        (staging / MARKER).unlink()
        p = self.path
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            if p.exists():
                p.rmdir()
            staging.rename(p)
        elif (ours := our_files(p)) is not None and _entries(p) <= ours:
            old = p.parent / f".{p.name}.old-{os.getpid()}"
            p.rename(old)
            staging.rename(p)
            shutil.rmtree(old, ignore_errors=True)
        else:                              # --overwrite into a folder holding other files: replace ours only
            for name in sorted(our_files(p) or ()):
                target = p / name
                if target.is_file():
                    target.unlink()
            for src in sorted(staging.rglob("*")):
                if src.is_file():
                    dst = p / src.relative_to(staging)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
            shutil.rmtree(staging, ignore_errors=True)
        self.staging = None
