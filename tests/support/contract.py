"""The published result contract, checked on results the engine built itself.

The engine builds parts of an ok result without validating them again (report.py); these
checks are what keeps that honest: the JSON a transport publishes validates against
schemas/result.json and reads back into an equal `FitResult`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from worker.engine.result import FitResult

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "result.json"


@cache
def _validator() -> Any:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    return jsonschema.validators.validator_for(schema)(schema)


def assert_result_contract(result: FitResult) -> None:
    published = result.model_dump_json(exclude_none=True)
    doc = json.loads(published)
    _validator().validate(doc)
    again = FitResult.model_validate(doc)
    assert again.model_dump_json(exclude_none=True) == published
