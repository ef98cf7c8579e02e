"""The one error tree of tokenheap; each branch says what the transport does with it.

TokenheapError
├── BadRequest            -> dead-letter (worker) / error result (CLI); never retried
│   ├── InvalidRequest    malformed JSON, schema violation, unknown field
│   ├── RequestTooLarge   over a byte, item-count or item-size limit
│   └── UnknownModel      no counter and no context window for the model
├── OverBudget            -> error result on the results topic: system + query cannot fit
├── CountingUnavailable   -> retriable: the count API did not answer (policy = fail)
└── ConfigError           -> startup refuses to run
"""

from __future__ import annotations


class TokenheapError(Exception):
    """Root of every error tokenheap raises on purpose."""

    code: str = "internal"
    """Stable machine-readable code, copied into `error.code` of a result."""
    retriable: bool = False
    """True when the same input may succeed later (the request is not at fault)."""


class BadRequest(TokenheapError):
    code = "bad_request"


class InvalidRequest(BadRequest):
    code = "invalid_request"


class RequestTooLarge(BadRequest):
    code = "request_too_large"


class UnknownModel(BadRequest):
    code = "unknown_model"


class OverBudget(TokenheapError):
    code = "over_budget"


class CountingUnavailable(TokenheapError):
    code = "counting_unavailable"
    retriable = True


class ConfigError(TokenheapError):
    code = "config_error"
