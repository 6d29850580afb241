"""JSON Schema for every message, for producers and consumers written in other languages."""

from __future__ import annotations

from pathlib import Path

import orjson
from goldstream.schemas.base import SCHEMA_VERSION
from goldstream.schemas.messages import MESSAGES


def json_schemas() -> dict[str, dict]:
    """File name -> JSON Schema (draft 2020-12, as pydantic writes it) of each message."""
    out = {}
    for model in MESSAGES:
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"goldstream/{SCHEMA_VERSION}/{model.__name__}.json"
        schema["x-topic"] = model.topic
        out[f"{model.__name__}.json"] = schema
    return out


def export(directory: Path) -> list[Path]:
    """Write every schema into `directory` (sorted keys, stable bytes) and return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in json_schemas().items():
        path = directory / name
        path.write_bytes(orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
        paths.append(path)
    return paths
