"""`-o` and interrupted runs: the tool never deletes or moves what it did not write, and a killed or interrupted run
leaves nothing that looks like output (DESIGN.md section 7, issue 9)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from mote.tools import cli
from mote.tools.output_dir import MARKER


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mote.export.loader import save_model
    from mote.tools.make_random_model import random_config, random_model

    d = tmp_path_factory.mktemp("m") / "model"
    save_model(random_model(random_config(layers=1, vision=False), 0), d)
    return d


def _export(model_dir, out, *extra):
    return cli.main(["--target", "onnx", str(model_dir), "-o", str(out), "--quiet", "--no-verify", "--max-seq-len",
                     "16", *extra])


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    return err[0]


def test_output_path_that_is_a_file_is_refused_and_kept(model_dir, tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("mine")
    assert _export(model_dir, f) == 2
    _one_error_line(capsys, str(f), "not a directory")
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_foreign_folder_is_refused_then_overwrite_keeps_the_users_files(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    (out / "text_decoder.onnx").write_text("my own file of the same name")
    assert _export(model_dir, out) == 2
    _one_error_line(capsys, str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.md", "text_decoder.onnx"]

    assert _export(model_dir, out, "--overwrite") == 0
    assert (out / "notes.md").read_text() == "my notes"
    report = json.loads((out / "report.json").read_text())
    assert set(report["files"]) | {"notes.md"} == {p.name for p in out.iterdir()}
    assert (out / "text_decoder.onnx").stat().st_size > 1000      # same-named file replaced by ours (allowed)
    assert not list(tmp_path.glob(".out.*"))                        # no staging or old copy left


def test_previous_output_is_replaced_only_when_it_holds_nothing_else(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert _export(model_dir, out) == 0
    first = sorted(p.name for p in out.iterdir())
    assert _export(model_dir, out) == 0                             # our own previous output: replaced
    assert sorted(p.name for p in out.iterdir()) == first
    (out / "notes.md").write_text("added by the user")
    assert _export(model_dir, out) == 2
    _one_error_line(capsys, str(out), "did not write")
    assert (out / "notes.md").read_text() == "added by the user"
    assert sorted(p.name for p in out.iterdir()) == sorted(first + ["notes.md"])


def test_stale_staging_of_a_dead_process_is_removed_and_nothing_else(model_dir, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.staging-{pid}"
    stale.mkdir()
    (stale / MARKER).write_text("")
    (stale / "model.pte").write_bytes(b"half written")
    not_ours = tmp_path / f".out.staging-{pid + 1}"      # no marker: not something we wrote
    not_ours.mkdir()
    assert _export(model_dir, out) == 0
    assert not stale.exists() and not_ours.is_dir()
    assert (out / "report.json").is_file()


def test_ctrl_c_cleans_up_and_exits_130(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mote.tools.cli", "--target", "onnx", str(model_dir), "-o",
                             str(out), "--quiet", "--max-seq-len", "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".out.staging-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert lines and lines[-1] == "mote-export: interrupted; nothing was written", err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_swallowed_ctrl_c_still_writes_nothing(model_dir, tmp_path, monkeypatch, capsys):
    """Python may run the Ctrl-C handler inside a finalizer the garbage collector called, where the KeyboardInterrupt
    is printed as "ignored" and the export goes on: the interrupt is remembered, so it still ends in exit 130 with
    nothing written (the lowering below sees Ctrl-C and carries on)."""
    from mote.targets import get_target
    from mote.tools import cli

    target = get_target("onnx")
    lower = target.lower

    def lower_through_a_swallowed_interrupt(*args, **kwargs):
        try:
            cli._interrupts.handler(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass                              # what a finalizer does with it
        return lower(*args, **kwargs)

    monkeypatch.setattr(target, "lower", lower_through_a_swallowed_interrupt)
    out = tmp_path / "out"
    assert cli.main(["--target", "onnx", str(model_dir), "-o", str(out), "--quiet", "--max-seq-len", "64"]) == 130
    assert capsys.readouterr().err.strip() == "mote-export: interrupted; nothing was written"
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
