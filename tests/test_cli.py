"""The goldstream command and the committed JSON Schema."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

import goldstream
from goldstream import schemas as s
from goldstream.cli import main
from tests.conftest import REPO


def test_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "goldstream.cli", "--version"], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == f"goldstream {goldstream.__version__}"


def test_committed_json_schemas_are_current(tmp_path: Path) -> None:
    assert main(["schemas", "export", str(tmp_path)]) == 0
    fresh = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_bytes() for p in (REPO / "schemas" / "json").glob("*.json")}
    assert set(fresh) == {f"{m.__name__}.json" for m in s.MESSAGES}
    stale = [name for name in fresh if committed.get(name) != fresh[name]]
    assert not stale, f"schemas/json is stale for {stale}: run `goldstream schemas export schemas/json`"
    assert set(committed) == set(fresh), "schemas/json holds a schema for no message"


def test_json_schemas_reject_unknown_fields_and_name_the_topic() -> None:
    schema = json.loads((REPO / "schemas" / "json" / "AnnotationSubmitted.json").read_text())
    assert schema["additionalProperties"] is False
    assert schema["x-topic"] == "annotations"
    assert {"event_id", "project_id", "item_id", "worker_id", "content", "submitted_at"} <= set(schema["required"])


def test_schemas_validate_reports_bad_lines(tmp_path: Path, capsys) -> None:
    good = s.GoldAnswer(
        event_id="g1", project_id="p", item_id="i", content=s.Content(), created_at=datetime(2026, 1, 1, tzinfo=UTC)
    )
    f = tmp_path / "gold.jsonl"
    f.write_bytes(good.to_bytes() + b"\n" + b'{"event_id": "g2"}\n\n' + good.to_bytes() + b"\n")
    assert main(["schemas", "validate", "GoldAnswer", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:2: invalid GoldAnswer: project_id: Field required" in err
    f.write_bytes(good.to_bytes() + b"\n")
    assert main(["schemas", "validate", "GoldAnswer", str(f)]) == 0


def test_a_settings_file_of_the_faust_era_still_loads_and_a_typo_is_refused(tmp_path: Path) -> None:
    from goldstream.streams.settings import Settings

    f = tmp_path / "settings.yaml"
    f.write_text("web_enabled: false\nweb_port: 6066\nbatch_max: 50\n")
    assert Settings.load(f, environ={}).batch_max == 50
    f.write_text("batch_maxx: 50\n")
    with pytest.raises(ValueError, match="unknown settings: batch_maxx"):
        Settings.load(f, environ={})
