"""A human view of a result, 80 columns wide: a bar per slot, what was dropped, the alerts.

Each slot's bar is scaled against that slot's allotment (its profile share of the context
window), so a full bar means "this slot used what it was given" whatever its size; query
and framing have no share and are scaled against the input budget. A slot over its share
(reflow gave it room another slot left unused) shows a full bar and its percentage past 100.
Long drop lists are summarised per slot (count, tokens, reasons, the first few ids).

Colour comes from `rich` when the output is a terminal; otherwise plain text.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from io import StringIO

from rich.cells import cell_len
from rich.console import Console
from rich.text import Text

from worker.engine.result import DroppedItem, FitResult

WIDTH = 80
BAR = 28
SHOWN_IDS = 4
SLOTS = ("system", "history", "context", "query", "tools", "framing")
HINTS = {
    "counting_unavailable": "offline, TOKENHEAP_ON_COUNT_UNAVAILABLE=estimate gives an "
    "estimate (marked ESTIMATE) instead of this error",
}
"""What a user can do about an error code, shown under it."""
Shares = Mapping[str, float]
"""Slot -> fraction of the context window (a profile's shares)."""


def render_table(r: FitResult, shares: Shares | None = None, *, color: bool = False) -> str:
    """The result as at most 80-column lines (no trailing newline after the last line but
    one, as before: callers add one)."""
    buf = StringIO()
    console = Console(
        file=buf,
        width=WIDTH,
        force_terminal=color,
        color_system="standard" if color else None,
        no_color=not color,
        highlight=False,
        soft_wrap=False,
    )
    for line in _lines(r, shares or {}, console):
        console.print(line)  # long messages arrive wrapped (`_hanging`), a line each
    return buf.getvalue()


def _hanging(label: Text, body: str, console: Console, style: str = "") -> list[Text]:
    """`label` then `body` wrapped to the width, each further line indented under the
    body's first character, so a long message does not run back to column 0 under the
    labels."""
    indent = label.cell_len
    wrapped = Text(body, style).wrap(console, WIDTH - indent)
    for line in wrapped:
        line.rstrip()  # the space a line was broken at
    return [
        Text.assemble(label if i == 0 else " " * indent, line) for i, line in enumerate(wrapped)
    ]


def _lines(r: FitResult, shares: Shares, console: Console) -> list[Text]:
    status = "green" if r.status == "ok" else "bold red"
    head = Text.assemble((r.request_id, "bold"), "  ", r.model, "  ", (f"[{r.status}]", status))
    lines = [head]
    if r.error is not None:
        label = Text.assemble("  ", ("error", "bold red"), " ")
        lines.extend(_hanging(label, f"{r.error.code}: {r.error.message}", console))
        hint = HINTS.get(r.error.code)
        if hint:
            lines.extend(_hanging(Text("  hint: ", "dim"), hint, console, "dim"))
        return lines
    u = r.usage
    if u is None:
        return lines
    exact = Text("exact", "green") if r.exact else Text("ESTIMATE", "bold yellow")
    lines.append(Text.assemble(f"  profile {r.profile}  counted by {r.count_method} (", exact, ")"))
    for name in SLOTS:
        used = int(getattr(u, name))
        share = shares.get(name)
        allot = round(share * u.max_context_tokens) if share else u.budget_tokens
        of = "share" if share else "budget"
        lines.append(_slot_line(name, used, allot, of))
    pct = f"{u.utilization:.1%}"
    lines.append(
        Text.assemble(
            f"  {'total':<8} ",
            _bar(u.total_tokens, u.budget_tokens),
            f" {u.total_tokens:>7,} / {u.budget_tokens:,} ",
            (pct, "bold red" if u.utilization >= 0.95 else "bold"),
        )
    )
    lines.append(
        Text(
            f"           output reserve {u.output_reserve:,} of a {u.max_context_tokens:,} window",
            "dim",
        )
    )
    if u.cost is not None:
        c = u.cost
        lines.append(
            Text(
                f"  cost     input ${c.input:.6f} ({c.cached_tokens:,} cached) + output "
                f"<= ${c.output_worst_case:.6f} = <= ${c.total_worst_case:.6f}",
                "dim",
            )
        )
    for slot in ("history", "context"):
        items = [d for d in r.dropped if d.slot == slot]
        if items:
            lines.append(_dropped_line(slot, items))
    for t in r.truncated[:SHOWN_IDS]:
        lines.append(
            Text.assemble(
                ("  cut      ", "yellow"),
                f"chunk {t.id!r}: {t.original_tokens:,} -> {t.kept_tokens:,} tokens",
            )
        )
    if len(r.truncated) > SHOWN_IDS:
        lines.append(Text(f"  cut      … and {len(r.truncated) - SHOWN_IDS} more", "yellow"))
    for a in r.alerts:
        style = "bold red" if a.severity == "critical" else "bold yellow"
        label = Text("  ALERT    ", style)
        lines.extend(_hanging(label, f"{a.type} [{a.severity}]: {a.message}", console))
    return lines


def _slot_line(name: str, used: int, allot: int, of: str) -> Text:
    ratio = used / allot if allot > 0 else 0.0
    style = "red" if ratio > 1.0 else ("yellow" if ratio >= 0.9 else "cyan")
    return Text.assemble(
        f"  {name:<8} ",
        _bar(used, allot, style),
        f" {used:>7,} / {allot:<7,} ",
        (f"{ratio:>4.0%}", style),
        (f" of {of}", "dim"),
    )


def _bar(used: int, of: int, style: str = "cyan") -> Text:
    filled = 0 if of <= 0 else min(BAR, round(BAR * used / of))
    return Text.assemble(("█" * filled, style), ("·" * (BAR - filled), "dim"))


def _dropped_line(slot: str, items: list[DroppedItem]) -> Text:
    """One line per slot however many were dropped: count, tokens, reasons, and as many of
    the first ids as fit in the width."""
    tokens = sum(d.tokens for d in items)
    reasons = ", ".join(f"{n} {k}" for k, n in Counter(d.reason for d in items).most_common(2))
    kind = "chunk" if slot == "context" else "turn"
    head = f"{len(items)} {kind}{'s' if len(items) != 1 else ''}, {tokens:,} tokens ({reasons})"
    room = WIDTH - len("  dropped  ") - len(head) - 2
    names: list[str] = []
    for k, d in enumerate(items):
        name = repr(d.id) if slot == "context" else f"#{d.index}"
        more = f" +{len(items) - k - 1} more" if k < len(items) - 1 else ""
        if cell_len(", ".join([*names, name]) + more) > room:
            break
        names.append(name)
    left = len(items) - len(names)
    tail = ", ".join(names) + (f" +{left} more" if left else "")
    return Text.assemble(("  dropped  ", "magenta"), head, (": " + tail) if tail else "")
