"""The message contracts as JSON Schema, generated from the pydantic models.

`schemas/` is checked in; `tokenheap schemas --check` (run by the tests) fails on drift.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from worker.engine.request import AssemblyRequest
from worker.engine.result import FitResult
from worker.stream.messages import DeadLetter
from worker.telemetry.alerts import AlertMessage

# What producers send is validated (input mode); what tokenheap emits is serialized.
CONTRACTS: dict[str, tuple[type[BaseModel], JsonSchemaMode]] = {
    "request.json": (AssemblyRequest, "validation"),
    "result.json": (FitResult, "serialization"),
    "alert.json": (AlertMessage, "serialization"),
    "dead-letter.json": (DeadLetter, "serialization"),
}


def render(model: type[BaseModel], mode: JsonSchemaMode) -> str:
    schema = model.model_json_schema(mode=mode)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (model, mode) in sorted(CONTRACTS.items()):
        path = folder / name
        path.write_text(render(model, mode), encoding="utf-8")
        written.append(path)
    return written


def check_schemas(folder: Path) -> list[str]:
    """Names of schema files missing or different from what the models generate."""
    stale = []
    for name, (model, mode) in sorted(CONTRACTS.items()):
        path = folder / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(model, mode):
            stale.append(name)
    return stale
