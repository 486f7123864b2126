"""Exports shared by the runtime tests of one session (an android export takes minutes on 2 cores): the generic suite
(test_targets.py) and the target-specific checks beside it (test_executorch_runtime.py, test_onnx_runtime.py) read
the same artifacts instead of exporting the same model again."""
import dataclasses
import json
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mote"


def _export_cli(target, model_dir, out, *flags) -> dict:
    """`mote-export --target T MODEL_DIR -o OUT --quiet FLAGS` through the CLI entry; exit 0 and report.json checked
    against its schema (the root conftest.py's autouse fixture does that only for exports inside a test function)."""
    import jsonschema

    from mote.tools import cli

    code = cli.main(["--target", target, str(model_dir), "-o", str(out), "--quiet", *flags])
    assert code == 0, f"mote-export --target {target} {model_dir} {' '.join(flags)} exited {code}"
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, json.loads(cli.REPORT_SCHEMA.read_text()), cls=jsonschema.Draft202012Validator)
    return report


@pytest.fixture(scope="session")
def export_cli():
    """export_cli(target, model_dir, out, *flags) -> report: one export through the CLI entry (exit 0 asserted)."""
    return _export_cli


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(target, model_dir, *flags) -> (out_dir, report): each distinct export runs once per session (one
    that failed is not retried: every test that needs it fails with the same error)."""
    done = {}

    def get(target, model_dir, *flags):
        key = (target, str(model_dir), flags)
        if key not in done:
            out = tmp_path_factory.mktemp(f"{target}-{Path(model_dir).name}") / "out"
            try:
                done[key] = (out, _export_cli(target, model_dir, out, *flags))
            except Exception as e:
                done[key] = e
        if isinstance(done[key], Exception):
            raise done[key]
        return done[key]

    return get


@dataclasses.dataclass
class Shared:
    """A model directory and the flags every test exports it with; `export(target)` -> (out_dir, report)."""

    model_dir: Path
    max_seq_len: int | None
    exported: object

    def export(self, target: str):
        flags = ("--max-seq-len", str(self.max_seq_len)) if self.max_seq_len else ()
        return self.exported(target, self.model_dir, *flags)


@pytest.fixture(scope="session")
def example(exported):
    """The shipped example model (examples/tiny-mote), exported with the defaults and verified."""
    if not (EXAMPLE / "config.json").is_file():
        pytest.skip("example model not trained yet")
    return Shared(EXAMPLE, None, exported)


@pytest.fixture(scope="session")
def odd(exported, tmp_path_factory):
    """A random model with widths that are not multiples of 32 (hidden 80, routed experts 72, shared expert 112),
    top-2 routing with norm_topk_prob renormalisation, per-output-channel expert scales; exported with a KV cache
    of 96 (not the default 128: what the runner constants must follow)."""
    from mote.export.loader import save_model
    from mote.tools.make_random_model import random_config, random_model

    d = tmp_path_factory.mktemp("odd") / "model"
    save_model(random_model(random_config(hidden=80, heads=4, kv_heads=2, intermediate=112, expert_intermediate=72,
                                          top_k=2, norm_topk_prob=True, per_channel=True, experts=3), 21), d)
    return Shared(d, 96, exported)
