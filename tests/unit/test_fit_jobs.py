"""`fit --jobs`: ranges of the file fitted by forks, results in input order, nothing lost."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_cli import ROOT, _req, run
from worker.catalog import Catalog
from worker.cli.fitjobs import line_ranges, lines_before, range_lines
from worker.engine.decode import Limits
from worker.engine.engine import Engine


@given(
    lines=st.lists(
        st.one_of(
            st.binary(max_size=30), st.text(alphabet="a\r\u00e9", max_size=8).map(str.encode)
        ).map(lambda b: b.replace(b"\n", b"")),
        max_size=12,
    ),
    trailing=st.booleans(),
    bom=st.booleans(),
    jobs=st.integers(1, 5),
)
def test_ranges_cover_the_file_at_line_starts(
    tmp_path_factory: object, lines: list[bytes], trailing: bool, bom: bool, jobs: int
) -> None:
    body = b"\n".join(lines) + (b"\n" if trailing and lines else b"")
    body = (b"\xef\xbb\xbf" if bom else b"") + body
    path = Path(str(tmp_path_factory.mktemp("ranges"))) / "f.jsonl"  # type: ignore[attr-defined]
    path.write_bytes(body)
    ranges = line_ranges(str(path), jobs)
    assert len(ranges) == jobs
    assert ranges[0][0] == 0 and ranges[-1][1] == len(body)
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start
    for start, end in ranges:
        assert start <= end
        # never inside a line (an empty range may sit at the end of the file)
        assert start in (0, len(body)) or body[start - 1 : start] == b"\n"
    for start, _ in ranges:  # where a range's error results number their lines from
        head = body[:start].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        assert lines_before(str(path), start) == head.count(b"\n")
    got: list[bytes] = []
    for start, end in ranges:
        try:
            got += [s.encode("utf-8") for s in range_lines(str(path), start, end, lambda n: None)]
        except UnicodeDecodeError:
            return  # random bytes: reported as not UTF-8 by the CLI (tested below)
    text = body.removeprefix(b"\xef\xbb\xbf")  # a byte order mark is skipped, as in the CLI
    assert b"".join(got) == text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    with path.open(encoding="utf-8-sig") as f:  # the sequential path's reading
        assert got == [line.encode("utf-8") for line in f]


def _write(tmp_path: Path, lines: list[str | bytes]) -> Path:
    src = tmp_path / "many.jsonl"
    src.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return src


def test_a_bad_line_in_a_later_range_gets_its_error_result_in_place(tmp_path: Path) -> None:
    lines: list[str | bytes] = [json.dumps(_req(i)) for i in range(40)]
    lines[31] = '{"request_id": "r31", "model": "gpt-4o"'  # cut short
    src = _write(tmp_path, lines)
    proc = run("fit", "--jobs", "2", str(src))
    assert proc.returncode == 1, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    ids = [f"r{i}" for i in range(40)]
    ids[31] = ""  # a line that does not parse has no readable id
    assert [d["request_id"] for d in docs] == ids
    assert [d["status"] for d in docs].count("error") == 1
    assert docs[31]["status"] == "error" and docs[31]["error"]["code"] == "invalid_request"


def test_line_numbers_count_a_line_break_split_between_blocks(tmp_path: Path) -> None:
    src = tmp_path / "long.jsonl"
    src.write_bytes(b"x" * ((1 << 20) - 1) + b"\r\n" + b"y\r" + b"z\n")  # \r | \n at 1 MiB
    assert lines_before(str(src), src.stat().st_size) == 3


def test_bad_lines_in_every_range_name_their_input_lines(tmp_path: Path) -> None:
    cut = '{"request_id": "r44", "model": "gpt-4o"'
    lines: list[str | bytes] = [json.dumps(_req(i)) for i in range(60)]
    lines[5] = ""
    lines[12] = json.dumps(_req(12, surprise=1))
    lines[20] = b"  \r"  # a blank line ending in CR LF (with the \n _write adds)
    lines[44] = cut
    src = _write(tmp_path, lines)
    want = [
        "line 13: surprise: Extra inputs are not permitted",
        f"line 45: invalid JSON: EOF while parsing an object at column {len(cut)}",
    ]
    for jobs in ("1", "2", "3"):  # the bad lines in the first range, in later ones
        proc = run("fit", "--jobs", jobs, str(src))
        assert proc.returncode == 1, proc.stderr
        docs = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [d["error"]["message"] for d in docs if d["status"] != "ok"] == want, jobs


def test_non_utf8_in_a_later_range_is_a_one_line_usage_error(tmp_path: Path) -> None:
    lines: list[str | bytes] = [json.dumps(_req(i)) for i in range(40)]
    lines[35] = b'{"request_id": "r35", "model": "gpt-4o", "query": "\xff"}'
    proc = run("fit", "--jobs", "2", str(_write(tmp_path, lines)))
    assert proc.returncode == 2
    assert "not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_reader_that_goes_away_stops_every_job_quietly(tmp_path: Path) -> None:
    src = _write(tmp_path, [json.dumps(_req(i)) for i in range(400)])
    with subprocess.Popen(
        [sys.executable, "-m", "worker", "fit", "--jobs", "2", str(src)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # like `| head -1`
        err = proc.stderr.read()
        code = proc.wait(timeout=60)
    assert json.loads(first)["request_id"] == "r0"
    assert code == 1
    assert b"Traceback" not in err, err.decode()


def test_a_child_that_dies_is_reported_not_taken_for_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, catalog: Catalog
) -> None:
    import os

    import worker.cli.fitjobs as fitjobs

    src = _write(tmp_path, [json.dumps(_req(i)) for i in range(20)])
    monkeypatch.setattr(fitjobs, "_child", lambda *args: os._exit(9))  # e.g. killed by OOM
    with pytest.raises(fitjobs.JobsFailed, match="exit code 9"):
        fitjobs.fit_ranges(
            lambda: Engine(catalog=catalog), str(src), Limits(), str, 2, io.StringIO()
        )


def test_progress_follows_the_bytes_the_children_read(tmp_path: Path, catalog: Catalog) -> None:
    import worker.cli.fitjobs as fitjobs

    src = _write(tmp_path, [json.dumps(_req(i)) for i in range(60)])
    seen: list[int] = []

    def progress(done: Callable[[], int], finished: Callable[[], bool]) -> None:
        fitjobs.poll_progress(seen.append, done, finished)

    out = tmp_path / "out.jsonl"
    with out.open("w", encoding="utf-8") as sink:
        code = fitjobs.fit_ranges(
            lambda: Engine(catalog=catalog),
            str(src),
            Limits(),
            lambda r: r.model_dump_json() + "\n",
            2,
            sink,
            progress,
        )
    assert code == 0
    assert seen == sorted(seen) and seen[-1] == src.stat().st_size
    assert len(out.read_text(encoding="utf-8").splitlines()) == 60


def test_a_child_that_raises_is_a_failure_not_error_results(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    catalog: Catalog,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """multiprocessing exits a child that raises with code 1, which is also 'some error
    result': a crash must not pass for that, with its output incomplete."""
    import worker.cli.fitjobs as fitjobs

    def broken(*_args: object, **_kw: object) -> object:
        raise RuntimeError("boom")

    src = _write(tmp_path, [json.dumps(_req(i)) for i in range(20)])
    monkeypatch.setattr(fitjobs, "fit_lines", broken)  # forked children inherit it
    with pytest.raises(fitjobs.JobsFailed, match="exit code 5"):
        fitjobs.fit_ranges(
            lambda: Engine(catalog=catalog), str(src), Limits(), str, 2, io.StringIO()
        )
    err = capfd.readouterr().err
    assert "tokenheap: --jobs process 0 failed (RuntimeError: boom)" in err
    assert "Traceback" not in err
