"""Shared by tests/ and runtime_tests/: every report.json that mote-export writes during a test is validated
against the report's JSON Schema (tools/report.schema.json)."""
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
