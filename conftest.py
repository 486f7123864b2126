"""Shared by tests/ and runtime_tests/: every report.json that mote-export writes during a test is validated
against the report's JSON Schema (tools/report.schema.json); the tests of one target are grouped for pytest-xdist."""
import json
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _reports_match_their_schema(monkeypatch):
    import jsonschema

    from mote.tools import cli

    schema = json.loads(cli.REPORT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    run = cli.run

    def run_and_validate(*args, **kwargs):
        report = run(*args, **kwargs)
        written = json.loads((Path(report["out_dir"]) / "report.json").read_text())
        jsonschema.validate(written, schema, cls=jsonschema.Draft202012Validator)
        return report

    monkeypatch.setattr(cli, "run", run_and_validate)


# runtime_tests/test_<backend>_*.py -> the target whose exports they read
BACKEND_FILES = {"executorch": "android", "coreml": "ios", "onnx": "onnx", "tvm": "tvm"}


def pytest_collection_modifyitems(config, items):
    """The suite runs in 2 workers (pyproject.toml: `-n 2 --dist loadgroup`). The tests of one target, by their
    `target` parameter or their backend's test file, form one group that runs in one worker, so the session-scoped
    exports they share (runtime_tests/conftest.py) are made once, not once per worker."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("target") if callspec is not None else None
        if target is None and item.path.parent.name == "runtime_tests":
            parts = item.path.stem.split("_")
            target = BACKEND_FILES.get(parts[1]) if len(parts) > 2 and parts[0] == "test" else None
        if target is not None:
            item.add_marker(pytest.mark.xdist_group(target))
