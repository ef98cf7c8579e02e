"""`--table`: 80 columns whatever the result holds, bars against each slot's share, long
drop lists summarised, colour only when asked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from rich.cells import cell_len

from worker.cli.table import BAR, WIDTH, render_table
from worker.engine.result import Alert, DroppedItem, FitResult, Usage

SHARES = {"output": 0.1, "system": 0.05, "history": 0.3, "context": 0.55}
WINDOW = 10_000


def result(
    *, context: int = 100, dropped: int = 0, id_text: str = "c", alerts: int = 0
) -> FitResult:
    usage = Usage(
        system=50, history=200, context=context, query=20, framing=10,
        total_tokens=280 + context, budget_tokens=9_000, output_reserve=1_000,
        max_context_tokens=WINDOW, utilization=(280 + context) / 9_000,
    )  # fmt: skip
    return FitResult(
        request_id="r",
        status="ok",
        model="gpt-4o",
        profile="rag-chatbot",
        count_method="tiktoken:o200k_base",
        exact=True,
        usage=usage,
        dropped=[
            DroppedItem(slot="context", id=f"{id_text}-{i}", index=i, tokens=7, reason="budget")
            for i in range(dropped)
        ],
        alerts=[Alert(type="utilization_high", message="m " * 60) for _ in range(alerts)],
    )


def bar_of(text: str, slot: str) -> str:
    line = next(x for x in text.splitlines() if x.strip().startswith(slot))
    return line.split()[1]


@given(
    dropped=st.integers(0, 1_500),
    id_text=st.text(min_size=1, max_size=120),
    alerts=st.integers(0, 3),
    context=st.integers(0, 50_000),
)
def test_every_line_fits_80_columns_and_drops_take_one_line(
    dropped: int, id_text: str, alerts: int, context: int
) -> None:
    text = render_table(result(context=context, dropped=dropped, id_text=id_text, alerts=alerts))
    lines = text.splitlines()
    assert all(cell_len(line) <= WIDTH for line in lines), lines
    assert sum(line.startswith("  dropped") for line in lines) == (1 if dropped else 0)
    assert len(lines) <= 10 + 3 * alerts + (2 if dropped else 0)
    if dropped:
        assert f"{dropped} chunk" in text


def test_bars_are_scaled_against_the_slots_share() -> None:
    share = round(SHARES["context"] * WINDOW)
    full = render_table(result(context=share), SHARES)
    half = render_table(result(context=share // 2), SHARES)
    assert bar_of(full, "context").count("█") == BAR
    assert bar_of(half, "context").count("█") == BAR // 2
    assert "100% of share" in full
    # without shares, the same tokens are a small part of the whole budget
    assert bar_of(render_table(result(context=share)), "context").count("█") < BAR


def test_colour_only_when_asked() -> None:
    r = result(dropped=3)
    assert "\x1b[" in render_table(r, SHARES, color=True)
    assert "\x1b[" not in render_table(r, SHARES, color=False)


def test_the_progress_bar_passes_lines_through_and_shows_on_a_terminal() -> None:
    import io

    from rich.console import Console

    from worker.cli.progress import PROGRESS_MIN_BYTES, wants_progress, with_progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    lines = [f'{{"n": {i}}}\n' for i in range(50)]
    assert list(with_progress(iter(lines), sum(map(len, lines)), console)) == lines
    assert "fitting" in buf.getvalue()
    plain = io.StringIO()  # not a terminal: no bar
    assert not wants_progress(PROGRESS_MIN_BYTES * 2, out=plain, err=plain)


def test_an_unavailable_count_names_the_setting_that_allows_estimates() -> None:
    from worker.engine.result import ErrorInfo

    r = FitResult(
        request_id="c",
        status="error",
        model="claude-sonnet-4-5",
        error=ErrorInfo(code="counting_unavailable", message="no client", retriable=True),
    )
    assert "TOKENHEAP_ON_COUNT_UNAVAILABLE=estimate" in render_table(r)


@given(words=st.lists(st.text("abcdefghij", min_size=1, max_size=30), min_size=1, max_size=60))
def test_a_long_alert_wraps_under_its_message_not_under_the_labels(words: list[str]) -> None:
    """Wrapped lines of an alert keep the message's column, so the labels' column stays
    readable; every word of the message is still there, in order."""
    message = " ".join(words)
    r = result().model_copy(update={"alerts": [Alert(type="t", message=message)]})
    lines = render_table(r).splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("  ALERT"))
    body = [lines[first]]
    body += [line for line in lines[first + 1 :] if line.startswith(" " * 11) and line.strip()]
    column = lines[first].index("t [warning]")
    assert all(line[:column].isspace() and not line[column].isspace() for line in body[1:])
    assert " ".join(" ".join(body)[column:].split()) == f"t [warning]: {message}"
    assert all(cell_len(line) <= WIDTH and line == line.rstrip() for line in lines)
