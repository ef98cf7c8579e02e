"""The one error tree of tokenheap; each branch says what the transport does with it.

TokenheapError
├── BadRequest            the request is at fault: never retried
│   ├── InvalidRequest    cannot be read (JSON, schema, unknown field) -> dead letter (worker),
│   │                     error result (CLI)
│   ├── RequestTooLarge   over a byte, item-count or item-size limit -> as InvalidRequest
│   ├── UnknownModel      no counter and no context window for the model -> error result
│   └── UnknownProfile    no such budget profile -> error result
├── OverBudget            -> error result: system + query cannot fit
├── CountingUnavailable   -> retriable error result: the count API did not answer
├── TransactionFailed     -> the worker stops; its records are read again from the commit
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


class UnknownProfile(BadRequest):
    code = "unknown_profile"


class OverBudget(TokenheapError):
    code = "over_budget"


class CountingUnavailable(TokenheapError):
    code = "counting_unavailable"
    retriable = True


class TransactionFailed(TokenheapError):
    """A transaction could not commit; its outputs are aborted, so the records behind them
    must be read again from the committed offset (the worker restarts to do that)."""

    code = "transaction_failed"
    retriable = True


class ConfigError(TokenheapError):
    code = "config_error"
