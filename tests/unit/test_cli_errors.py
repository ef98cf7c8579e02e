"""A user's mistakes through the real CLI: one readable line on stderr, no traceback, and the
documented exit code (0 all ok, 1 some error results, 2 usage or configuration)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = json.loads((REPO / "examples" / "request.json").read_text(encoding="utf-8"))


def clean_env() -> dict[str, str]:
    """This environment without tokenheap's and OpenTelemetry's variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TOKENHEAP_", "OTEL_"))}


def run(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    clean = clean_env()
    data = stdin
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        input=data,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**clean, **env},
        timeout=120,
    )


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("tokenheap: "), proc.stderr


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda d: str(d / "nope.json"), "no such file"),
        (lambda d: str(d), "is a directory"),
        (lambda d: _write(d / "bin.jsonl", b"\x89PNG\r\n\x1a\n\x00\xff\xfe"), "not UTF-8 text"),
    ],
    ids=["missing", "directory", "binary"],
)
def test_an_unreadable_input_is_a_usage_error(tmp_path: Path, make: Any, says: str) -> None:
    proc = run("fit", make(tmp_path))
    assert proc.returncode == 2
    no_traceback(proc)
    assert says in proc.stderr


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("TOKENHEAP_MAX_IN_FLIGHT", "abc", "TOKENHEAP_MAX_IN_FLIGHT"),
        ("TOKENHEAP_DELIVERY", "exactly_once", "'exactly-once'"),
        ("TOKENHEAP_SETTINGS_FILE", "/nonexistent/tokenheap.yaml", "no such file"),
    ],
)
def test_a_bad_setting_is_a_configuration_error(var: str, value: str, says: str) -> None:
    proc = run("fit", "-", stdin=json.dumps(EXAMPLE), **{var: value})
    assert proc.returncode == 2
    no_traceback(proc)
    assert says in proc.stderr and value in proc.stderr
    assert proc.stdout == ""


def test_a_settings_file_that_is_not_yaml_is_a_configuration_error(tmp_path: Path) -> None:
    bad = tmp_path / "settings.yaml"
    bad.write_text("max_in_flight: [1,\n", encoding="utf-8")
    proc = run("fit", "-", stdin=json.dumps(EXAMPLE), TOKENHEAP_SETTINGS_FILE=str(bad))
    assert proc.returncode == 2
    no_traceback(proc)
    assert "is not valid YAML" in proc.stderr


def test_a_misspelt_variable_is_named_with_its_likely_meaning() -> None:
    proc = run("fit", "-", stdin=json.dumps(EXAMPLE), TOKENHEAP_BOOTSTRAP_SERVER="kafka:9092")
    assert proc.returncode == 0, proc.stderr
    assert "TOKENHEAP_BOOTSTRAP_SERVER is not a tokenheap setting" in proc.stderr
    assert "did you mean TOKENHEAP_BOOTSTRAP_SERVERS?" in proc.stderr


def test_contradicting_sizes_stop_the_worker_before_it_connects() -> None:
    proc = run("worker", TOKENHEAP_MAX_REQUEST_BYTES="4194304")
    assert proc.returncode == 2
    no_traceback(proc)
    assert "TOKENHEAP_MAX_MESSAGE_BYTES" in proc.stderr


def test_a_health_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(
            "worker",
            TOKENHEAP_HEALTH_PORT=str(port),
            TOKENHEAP_BOOTSTRAP_SERVERS="127.0.0.1:1",
            OTEL_SDK_DISABLED="true",
        )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"health port 127.0.0.1:{port} is already in use" in proc.stderr


def test_a_pretty_printed_document_on_stdin_is_one_request() -> None:
    proc = run("fit", "-", stdin=json.dumps(EXAMPLE, indent=2))
    assert proc.returncode == 0, proc.stderr
    (result,) = [json.loads(proc.stdout)]  # one document back, not one line per line in
    assert result["request_id"] == EXAMPLE["request_id"] and result["status"] == "ok"


def test_ndjson_is_lines_and_error_results_exit_1(tmp_path: Path) -> None:
    good = dict(EXAMPLE, request_id="a")
    bad = dict(EXAMPLE, request_id="b", model="no-such-model")
    src = tmp_path / "batch.ndjson"
    src.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n", encoding="utf-8")
    proc = run("fit", str(src))
    assert proc.returncode == 1
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(o["request_id"], o["status"]) for o in out] == [("a", "ok"), ("b", "error")]
    src.write_text(json.dumps(good) + "\n", encoding="utf-8")
    assert run("fit", str(src)).returncode == 0


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    src = tmp_path / "many.jsonl"
    src.write_text(
        "".join(json.dumps(dict(EXAMPLE, request_id=f"r{i}")) + "\n" for i in range(300)),
        encoding="utf-8",
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TOKENHEAP_")}
    proc = subprocess.run(
        f"{sys.executable} -m worker fit {src} | head -c 10 > /dev/null; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        cwd=REPO,
        env=clean,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 1


def test_version_and_help_on_every_command() -> None:
    from worker import __version__
    from worker.cli.main import _parser

    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"tokenheap {__version__}"
    parser = _parser()
    subs = next(a for a in parser._actions if a.dest == "cmd")
    choices: dict[str, Any] = subs.choices  # type: ignore[assignment]
    helped = {a.dest for a in subs._choices_actions}  # type: ignore[attr-defined]
    assert helped == set(choices)
    for name, sub in choices.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        assert sub.description, f"{name} has no description"
        assert name in (parser.description or ""), f"the top-level help leaves {name} out"
    for args in [[], *([name] for name in choices)]:
        shown = run(*args, "--help", COLUMNS="80")
        assert shown.returncode == 0, shown.stderr
        assert "exit codes (the same for every command):" in shown.stdout, args
        assert max(map(len, shown.stdout.splitlines())) <= 80, args  # descriptions wrapped


def test_a_broken_pretty_document_is_one_error_at_its_own_position(tmp_path: Path) -> None:
    lines = json.dumps(EXAMPLE, indent=2).splitlines()
    lines[-2] += ","  # a trailing comma before the closing brace
    src = tmp_path / "req.json"
    src.write_text("\n" + "\n".join(lines) + "\n", encoding="utf-8")  # a blank line first
    proc = run("fit", str(src))
    assert proc.returncode == 1, proc.stderr
    (result,) = [json.loads(proc.stdout)]  # one result, pretty, not one per line
    assert result["error"]["code"] == "invalid_request"
    # the closing brace after the comma, counted in the file (the blank line included)
    assert f"trailing comma at line {len(lines) + 1} column 1" in result["error"]["message"]


def test_a_jsonl_whose_first_line_is_broken_still_gets_one_error_per_line(
    tmp_path: Path,
) -> None:
    good = json.dumps(dict(EXAMPLE, request_id="b"))
    src = tmp_path / "batch.jsonl"
    src.write_text('{"request_id": "a", "model": "gpt-4o"\n' + good + "\n{oops}\n", "utf-8")
    proc = run("fit", str(src))
    assert proc.returncode == 1, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["status"] for o in out] == ["error", "ok", "error"]


@pytest.mark.parametrize("jobs", [[], ["--jobs", "2"]], ids=["one", "jobs"])
@pytest.mark.parametrize("name", ["req.json", "batch.jsonl"])
def test_a_byte_order_mark_is_skipped(tmp_path: Path, name: str, jobs: list[str]) -> None:
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(dict(EXAMPLE, request_id=f"r{i}")) + "\n" for i in range(4))
    else:
        text = json.dumps(EXAMPLE, indent=2)
    src = tmp_path / name
    src.write_text(text, encoding="utf-8-sig")
    assert src.read_bytes().startswith(b"\xef\xbb\xbf")
    proc = run("fit", *jobs, str(src))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = run("fit", "-", stdin="\ufeff" + text)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "name"),
    [
        (["empty.json"], None, "empty.json"),
        (["blank.jsonl"], None, "blank.jsonl"),
        (["/dev/null"], None, "/dev/null"),
        (["-"], "", "stdin"),
        (["-"], "\n  \n", "stdin"),
    ],
    ids=["empty", "blank", "dev-null", "stdin", "stdin-blank"],
)
def test_an_input_without_requests_is_a_usage_error(
    tmp_path: Path, args: list[str], stdin: str | None, name: str
) -> None:
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text("\n \n\t\n", encoding="utf-8")
    paths = [a if a in ("-", "/dev/null") else str(tmp_path / a) for a in args]
    proc = run("fit", *paths, stdin=stdin)
    assert proc.returncode == 2
    no_traceback(proc)
    shown = name if name in ("stdin", "/dev/null") else str(tmp_path / name)
    assert proc.stderr.strip() == f"tokenheap: {shown} holds no requests"
    assert proc.stdout == ""


def test_the_output_form_follows_the_content_not_the_name(tmp_path: Path) -> None:
    text = "".join(json.dumps(dict(EXAMPLE, request_id=f"r{i}")) + "\n" for i in range(3))
    src = tmp_path / "batch.json"  # JSON lines under a .json name
    src.write_text(text, encoding="utf-8")
    named, piped = run("fit", str(src)), run("fit", "-", stdin=text)
    assert named.returncode == piped.returncode == 0, named.stderr
    assert named.stdout == piped.stdout
    ids = [json.loads(line)["request_id"] for line in named.stdout.splitlines()]
    assert ids == ["r0", "r1", "r2"]  # one result per line, not indented
    pretty = tmp_path / "one.jsonl"  # and one document under a JSON lines name
    pretty.write_text(json.dumps(EXAMPLE, indent=2), encoding="utf-8")
    proc = run("fit", str(pretty))
    assert proc.returncode == 0 and proc.stdout.startswith("{\n  "), proc.stdout[:80]


def test_a_bad_json_line_on_stdin_names_its_line_counting_blank_ones() -> None:
    good = json.dumps(EXAMPLE)
    proc = run("fit", "-", stdin="\n\n" + good + "\n\n" + good[:30] + "\n")
    assert proc.returncode == 1, proc.stderr
    ok, bad = [json.loads(line) for line in proc.stdout.splitlines()]
    assert ok["status"] == "ok"
    want = "line 5: invalid JSON: EOF while parsing a string at column 30"  # not "line 2"
    assert bad["error"]["message"] == want


@pytest.mark.parametrize("jobs", ["0", "-1", "two"])
def test_jobs_below_one_is_a_usage_error(jobs: str) -> None:
    proc = run("fit", "--jobs", jobs, "examples/request.json")
    assert proc.returncode == 2
    assert "argument --jobs" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def run_into(sink: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`run`, stdout sent to `sink` (a path such as /dev/full)."""
    clean = clean_env()
    with open(sink, "w", encoding="utf-8") as out:
        return subprocess.run(
            [sys.executable, "-m", "worker", *args],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=clean,
            timeout=120,
        )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "args",
    [
        ["fit", "examples/request.json"],
        ["fit", "--table", "examples/request.json"],
        ["fit", "{jsonl}"],
        ["fit", "--jobs", "2", "{jsonl}"],
        ["fit", "--jobs", "2", "--table", "{jsonl}"],
        ["--help"],
        ["fit", "--help"],
        ["config-docs"],
        ["schemas", "--out", "{tmp}"],
    ],
    ids=lambda a: " ".join(a),
)
def test_a_full_disk_is_one_line_and_exit_1(tmp_path: Path, args: list[str]) -> None:
    jsonl = tmp_path / "many.jsonl"  # results well over a write buffer, in both --jobs ranges
    jsonl.write_text(
        "".join(json.dumps(dict(EXAMPLE, request_id=f"r{i}")) + "\n" for i in range(40)),
        encoding="utf-8",
    )
    args = [a.format(jsonl=jsonl, tmp=tmp_path / "schemas") for a in args]
    proc = run_into("/dev/full", *args)
    assert proc.returncode == 1
    assert proc.stderr == "tokenheap: cannot write the output: No space left on device\n"


def test_schemas_into_a_file_or_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    afile = tmp_path / "README.md"
    afile.write_text("", encoding="utf-8")
    proc = run("schemas", "--out", str(afile))
    assert proc.returncode == 2
    assert proc.stderr == f"tokenheap: {afile} is a file; --out takes a folder\n"
    proc = run("schemas", "--out", str(afile / "sub"))
    assert proc.returncode == 2
    no_traceback(proc)
    assert f"cannot write the schemas in {afile / 'sub'}: Not a directory" in proc.stderr


def test_schemas_check_without_a_schemas_folder_says_so_once(tmp_path: Path) -> None:
    """Outside a checkout there is nothing to compare with: one usage error, not every
    schema reported out of date."""
    missing = tmp_path / "schemas"
    proc = run("schemas", "--check", "--out", str(missing))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"tokenheap: {missing}: no such folder to check; --out names the schemas folder\n"
    )
    assert proc.stdout == ""


def test_a_jsonl_first_line_cut_after_a_comma_is_still_json_lines(tmp_path: Path) -> None:
    """A first line ending in `,` could start a pretty-printed document, but a later line
    that is a request on its own says the input is JSON lines: the good lines are fitted."""
    good = json.dumps({"request_id": "ok-1", "model": "gpt-4o", "query": "hi"})
    path = tmp_path / "cut.jsonl"
    path.write_text('{"model": "gpt-4o", "query": "hi",\n' + good + "\n", encoding="utf-8")
    proc = run("fit", str(path))
    assert proc.returncode == 1, proc.stderr
    bad, ok = (json.loads(line) for line in proc.stdout.splitlines())
    assert bad["error"]["message"].startswith("line 1: invalid JSON")
    assert ok["request_id"] == "ok-1" and ok["status"] == "ok"


def test_a_document_cut_short_is_placed_on_its_last_line(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('{"request_id": "a", "model": "gpt-4o"\n', encoding="utf-8")
    proc = run("fit", str(path))
    assert proc.returncode == 1
    message = json.loads(proc.stdout)["error"]["message"]
    assert message == "Invalid JSON: EOF while parsing an object at line 1 column 37"


def test_crlf_lines_get_the_same_column_named_or_on_stdin(tmp_path: Path) -> None:
    text = '{"request_id":"a","model":"gpt-4o","query":"q"}\r\n{"request_id":"b","query":\r\n'
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(text.encode())
    named = run("fit", str(path)).stdout.splitlines()[-1]
    piped = run("fit", "-", stdin=text).stdout.splitlines()[-1]
    assert json.loads(named)["error"] == json.loads(piped)["error"]
    assert "line 2: invalid JSON" in json.loads(piped)["error"]["message"]


@pytest.mark.parametrize("args", [("--help",), ("fit", "examples/request.json")])
def test_a_closed_stdout_is_one_line_and_exit_1(args: tuple[str, ...]) -> None:
    clean = clean_env()
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=clean,
        timeout=120,
        preexec_fn=lambda: os.close(1),  # `>&-`: the process starts without a stdout
    )
    assert proc.returncode == 1
    assert proc.stderr == "tokenheap: stdout is closed; nothing could be written\n"
