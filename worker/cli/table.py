"""A human view of a result: a bar per slot, what was dropped, the alerts."""

from __future__ import annotations

from worker.engine.result import FitResult

WIDTH = 40


def _bar(used: int, of: int) -> str:
    filled = 0 if of <= 0 else min(WIDTH, round(WIDTH * used / of))
    return "█" * filled + "·" * (WIDTH - filled)


def render_table(r: FitResult) -> str:
    lines = [f"{r.request_id}  {r.model}  [{r.status}]"]
    if r.error is not None:
        lines.append(f"  error {r.error.code}: {r.error.message}")
        return "\n".join(lines) + "\n"
    u = r.usage
    if u is None:
        return "\n".join(lines) + "\n"
    exact = "exact" if r.exact else "ESTIMATE"
    lines.append(f"  profile {r.profile}  counted by {r.count_method} ({exact})")
    for name, used in (
        ("system", u.system),
        ("history", u.history),
        ("context", u.context),
        ("query", u.query),
        ("framing", u.framing),
    ):
        lines.append(f"  {name:<8} {_bar(used, u.budget_tokens)} {used:>8}")
    lines.append(
        f"  {'total':<8} {_bar(u.total_tokens, u.budget_tokens)} {u.total_tokens:>8}"
        f" / {u.budget_tokens} ({u.utilization:.1%}); output reserve {u.output_reserve}"
        f" of a {u.max_context_tokens} window"
    )
    if u.cost is not None:
        c = u.cost
        lines.append(
            f"  cost     input ${c.input:.6f} ({c.cached_tokens} cached), output up to "
            f"${c.output_worst_case:.6f}, total up to ${c.total_worst_case:.6f}"
        )
    for d in r.dropped:
        what = f"chunk {d.id!r}" if d.slot == "context" else f"history[{d.index}]"
        lines.append(f"  dropped  {what}: {d.tokens} tokens ({d.reason})")
    for t in r.truncated:
        lines.append(f"  cut      chunk {t.id!r}: {t.original_tokens} -> {t.kept_tokens} tokens")
    for a in r.alerts:
        lines.append(f"  ALERT    {a.type} [{a.severity}]: {a.message}")
    return "\n".join(lines) + "\n"
