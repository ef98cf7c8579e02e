"""A stated local estimate of a PDF's tokens, for when no provider counter can answer.

Neither provider publishes a PDF rule: Anthropic gives a range per page (text, plus each page
as an image), OpenAI nothing. The estimate is pages x the configured per-page figure (the top
of Anthropic's range), so it errs high; it is always reported as inexact.
"""

from __future__ import annotations

import base64
import binascii
import re

from worker.errors import InvalidRequest, RequestTooLarge
from worker.providers.rules import PayloadRules, default_rules

PDF_ESTIMATE = "document: PDF estimated per page (no local rule)"
_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def pdf_pages(raw: bytes) -> int | None:
    """Page objects in the file; None when none can be seen (compressed object streams)."""
    if not raw.startswith(b"%PDF"):
        raise InvalidRequest("document data is not a PDF (no %PDF header)")
    pages = len(_PAGE.findall(raw))
    return pages or None


def pdf_tokens(data: str, rules: PayloadRules | None = None) -> int:
    """Estimated tokens of a base64 PDF: pages x tokens_per_page."""
    rule = (rules or default_rules()).document_rules
    if len(data) * 3 // 4 > rule.max_decoded_bytes:
        raise RequestTooLarge(f"PDF is over {rule.max_decoded_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("document data is not valid base64") from None
    pages = pdf_pages(raw) or rule.unknown_pages
    return pages * rule.tokens_per_page
