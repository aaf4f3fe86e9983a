#!/usr/bin/env python3
"""Runs README.md's walkthrough against a live vitals and checks every output.

Usage (scripts/walkthrough.sh starts the server and calls this):
    walkthrough.py run --addr HOST:PORT [--readme README.md]
    walkthrough.py extract [--readme README.md]    print the commands found
    walkthrough.py selftest                         test the output matcher

`run` does two things, against a server with a fresh, empty database:

1. README walkthrough. Every grpcurl / buf curl command of the shell code
   blocks (```sh, bash, shell, console) of the "## Walkthrough" section runs
   in order, as written (through bash: `\\` continuations and heredocs such
   as `-d @ ... <<'EOF'` work as in a terminal), with 127.0.0.1:50051
   replaced by the test server's address. Each must exit 0. When a shell
   block is followed by an output block (the next code block of the section,
   when it is not a shell block; prose may stand between them), the output
   of the block's LAST command must match it:
     ```json   the same JSON documents, in the same order, with the same keys,
               nesting, value types and values, except where the README
               abbreviates: a value "..." matches any value; a line `...` in
               an object allows more keys, in an array more elements, at the
               top level more documents.
     ```       (any other fence) the same lines, in order; a line `...`
               stands for any number of lines.
   An output block whose first line is `ERROR:` shows grpcurl's report of
   a failed call: that command must exit non-zero and its stderr must match
   the block (as lines).
2. Reflection contract, with no proto files: grpcurl (reflection v1alpha)
   and buf curl (--reflect-protocol grpc-v1) each list every service and
   method, and call every RPC: the unary ones (GetLock of a key nobody
   holds must fail, NOT_FOUND), WatchTransitions and ObserveLeader
   (cut after a short time), WithLock and Campaign (messages on stdin).

Prints one line per check and closes with "walkthrough: N passed, N failed";
exits 1 if any check failed. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import json
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable

README_ADDR = "127.0.0.1:50051"
README_ADDR_RE = re.compile(r"(?:127\.0\.0\.1|localhost):50051\b")
SECTION = "## Walkthrough"
# The Security section's worked example, run against a second vitals with
# TLS, mTLS, a token and a probe listener (walkthrough.sh starts it after
# running the subsection's first block, which makes the certificates): its
# commands name localhost:50051 (the TLS listener) and 127.0.0.1:50052 (the
# probe listener), and run in the directory of the certificates.
TLS_SECTION = "### Trying TLS and a token"
TLS_ADDR_RE = re.compile(r"localhost:50051\b")
PROBE_ADDR_RE = re.compile(r"127\.0\.0\.1:50052\b")
SHELL_LANGS = {"sh", "bash", "shell", "console", "shell-session"}
COMMAND_TIMEOUT = 30.0  # seconds, per command
README_LABEL = "README.md"  # how messages name the README (set by main)

HEALTH_METHODS = [
    "ClearMaintenance",
    "ConfigureCheck",
    "ConfigureSystem",
    "DeleteCheck",
    "DeleteSystem",
    "EvaluateHealth",
    "GetSystemHealth",
    "GetUptime",
    "ListRuns",
    "ListSystems",
    "ListTransitions",
    "SetMaintenance",
    "SubmitRun",
    "WatchTransitions",
]
LOCK_METHODS = ["Campaign", "GetLock", "ListLocks", "ObserveLeader", "WithLock"]
SERVICES = [
    "grpc.health.v1.Health",
    "vitals.v1.HealthCheckService",
    "vitals.v1.LockService",
]


# --------------------------------------------------------------- extraction


@dataclasses.dataclass
class Expected:
    kind: str  # "json" or "lines"
    text: str
    line: int  # 1-based line of the opening fence


@dataclasses.dataclass
class Command:
    script: str  # the command as written, heredoc included, for bash -c
    line: int  # 1-based line of its first line in the README
    expected: Expected | None = None

    @property
    def display(self) -> str:
        """The command on one line (continuations joined, heredoc left out)."""
        first = []
        for raw in self.script.split("\n"):
            first.append(raw.rstrip("\\").strip())
            if not raw.endswith("\\"):
                break
        return " ".join(p for p in first if p)


@dataclasses.dataclass
class Block:
    lang: str
    lines: list[str]
    line: int  # 1-based line of the opening fence


class ExtractError(Exception):
    pass


def section_blocks(text: str, heading: str = SECTION) -> list[Block]:
    """The fenced code blocks of the section under `heading` (up to the next
    heading of the same or a higher level)."""
    lines = text.split("\n")
    level = len(heading) - len(heading.lstrip("#"))
    start = None
    in_fence = None
    blocks: list[Block] = []
    current: Block | None = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if in_fence is not None:
            if stripped == in_fence:
                if current is not None:
                    blocks.append(current)
                in_fence, current = None, None
            elif current is not None:
                current.lines.append(line)
            continue
        fence = re.match(r"^\s*(`{3,}|~{3,})\s*([^\s`]*)", line)
        if fence:
            in_fence = fence.group(1)
            if start is not None:
                current = Block(fence.group(2).lower(), [], i + 1)
            continue
        heading_match = re.match(r"^(#+)\s", line)
        if heading_match:
            if start is None:
                if line.rstrip() == heading:
                    start = i
            elif len(heading_match.group(1)) <= level:
                break
    if start is None:
        raise ExtractError(f'no "{heading}" section')
    if in_fence is not None and current is not None:
        raise ExtractError(f"code block at line {current.line} is not closed")
    return blocks


def split_commands(block: Block) -> list[Command]:
    """Splits a shell block into commands: `\\` continuations and heredoc
    bodies stay with their command; blank lines and comments are dropped."""
    commands: list[Command] = []
    lines = block.lines
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            i += 1
            continue
        first = i
        parts = [re.sub(r"^\s*\$\s+", "", line)]
        while parts[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        logical = " ".join(p.rstrip("\\") for p in parts)
        for heredoc in re.finditer(r"<<(-?)\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2", logical):
            dash, delimiter = heredoc.group(1), heredoc.group(3)
            while True:
                i += 1
                if i >= len(lines):
                    raise ExtractError(
                        f"line {block.line + 1 + first}: heredoc {delimiter} is not closed"
                    )
                parts.append(lines[i])
                body = lines[i].lstrip("\t") if dash else lines[i]
                if body == delimiter:
                    break
        commands.append(Command("\n".join(parts), block.line + 1 + first))
        i += 1
    return commands


def is_client_command(command: Command) -> bool:
    words = command.display.split()
    return bool(words) and (words[0] == "grpcurl" or words[:2] == ["buf", "curl"])


def extract(text: str, section: str = SECTION) -> tuple[list[Command], list[str]]:
    """The section's grpcurl / buf curl commands, each with the output
    block that belongs to it, and notes about anything skipped."""
    blocks = section_blocks(text, section)
    commands: list[Command] = []
    notes: list[str] = []
    for n, block in enumerate(blocks):
        if block.lang not in SHELL_LANGS:
            continue
        found = split_commands(block)
        for command in found:
            if is_client_command(command):
                commands.append(command)
            else:
                notes.append(f"{README_LABEL}:{command.line}: not a grpcurl / buf curl command, not run: {command.display}")
        following = blocks[n + 1] if n + 1 < len(blocks) else None
        if following is not None and following.lang not in SHELL_LANGS:
            kind = "json" if following.lang == "json" else "lines"
            expected = Expected(kind, "\n".join(following.lines), following.line)
            client = [c for c in found if is_client_command(c)]
            if not client or client[-1] is not found[-1]:
                raise ExtractError(
                    f"the output block at line {following.line} follows a block whose last "
                    "command is not a grpcurl / buf curl command"
                )
            client[-1].expected = expected
    if not commands:
        raise ExtractError(f'no grpcurl / buf curl command in "{section}"')
    return commands, notes


def setup_script(text: str, section: str = TLS_SECTION) -> str:
    """The first shell block of `section`: what prepares its commands."""
    for block in section_blocks(text, section):
        if block.lang in SHELL_LANGS:
            return "\n".join(block.lines) + "\n"
    raise ExtractError(f'no shell block in "{section}"')


# ------------------------------------------------ JSON with "..." placeholders


class _Any:
    def __repr__(self) -> str:
        return '"..."'


ANY = _Any()


class OpenDict(dict):
    """An expected object; open=True when the README wrote a `...` line in it."""

    open = False


class OpenList(list):
    """An expected array (or the top-level sequence of documents)."""

    open = False


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<punct>[{}\[\]:,])
      | (?P<ellipsis>\.\.\.|…)
      | (?P<string>")
      | (?P<literal>-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null)
    )""",
    re.VERBOSE,
)


class ParseError(Exception):
    pass


def _tokens(text: str) -> list[tuple[str, Any, int]]:
    out = []
    pos = 0
    decoder = json.JSONDecoder()
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected {text[pos:pos + 20]!r} at offset {pos}")
        if m.group("punct"):
            out.append(("p", m.group("punct"), pos))
            pos = m.end()
        elif m.group("ellipsis"):
            out.append(("...", None, pos))
            pos = m.end()
        elif m.group("string"):
            start = m.start("string")
            value, pos = json.decoder.scanstring(text, start + 1)
            out.append(("v", ANY if value in ("...", "…") else value, start))
        else:
            value, end = decoder.raw_decode(text, m.start("literal"))
            out.append(("v", value, m.start("literal")))
            pos = end


def parse_expected(text: str) -> OpenList:
    """Parses the README's JSON documents, with `...` placeholders."""
    toks = _tokens(text)
    i = 0

    def peek(kind: str, value: Any = None) -> bool:
        return i < len(toks) and toks[i][0] == kind and (value is None or toks[i][1] == value)

    def take(kind: str, value: Any = None) -> Any:
        nonlocal i
        if not peek(kind, value):
            got = "end of block" if i >= len(toks) else repr(toks[i][1] if toks[i][0] != "..." else "...")
            raise ParseError(f"expected {value or kind}, got {got}")
        i += 1
        return toks[i - 1][1]

    def value() -> Any:
        nonlocal i
        if peek("p", "{"):
            take("p", "{")
            obj = OpenDict()
            while not peek("p", "}"):
                if peek("..."):
                    take("...")
                    obj.open = True
                else:
                    key = take("v")
                    if not isinstance(key, str):
                        raise ParseError(f"object key {key!r} is not a string")
                    take("p", ":")
                    obj[key] = value()
                if not peek("p", "}"):
                    take("p", ",")
            take("p", "}")
            return obj
        if peek("p", "["):
            take("p", "[")
            arr = OpenList()
            while not peek("p", "]"):
                if peek("..."):
                    take("...")
                    arr.open = True
                else:
                    arr.append(value())
                if not peek("p", "]"):
                    take("p", ",")
            take("p", "]")
            return arr
        return take("v")

    docs = OpenList()
    while i < len(toks):
        if peek("..."):
            take("...")
            docs.open = True
        else:
            docs.append(value())
    return docs


def parse_actual(text: str) -> list[Any]:
    """Parses concatenated JSON documents (grpcurl / buf curl print one per
    message)."""
    decoder = json.JSONDecoder()
    docs = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return docs
        doc, pos = decoder.raw_decode(text, pos)
        docs.append(doc)


def _type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def match(expected: Any, actual: Any, path: str = "$") -> list[str]:
    """Differences between an expected value (with placeholders) and an actual
    one, each as 'PATH: what'."""
    if expected is ANY:
        return []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path}: expected an object, got {_type(actual)} {json.dumps(actual)[:80]}"]
        problems = []
        for key, value in expected.items():
            if key not in actual:
                problems.append(f"{path}.{key}: missing")
            else:
                problems += match(value, actual[key], f"{path}.{key}")
        extra = [k for k in actual if k not in expected]
        if extra and not getattr(expected, "open", False):
            problems.append(f"{path}: unexpected key(s) {', '.join(extra)} (add a `...` line to allow more keys)")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list):
            return [f"{path}: expected an array, got {_type(actual)}"]
        problems = []
        if len(actual) < len(expected) or (len(actual) > len(expected) and not getattr(expected, "open", False)):
            problems.append(f"{path}: expected {len(expected)} element(s), got {len(actual)}")
        for n, (e, a) in enumerate(zip(expected, actual)):
            problems += match(e, a, f"{path}[{n}]")
        return problems
    if _type(expected) != _type(actual):
        return [f"{path}: expected {_type(expected)} {json.dumps(expected)}, got {_type(actual)} {json.dumps(actual)[:80]}"]
    if expected != actual:
        return [f"{path}: expected {json.dumps(expected)}, got {json.dumps(actual)[:80]}"]
    return []


def match_json(expected_text: str, actual_text: str) -> list[str]:
    try:
        expected = parse_expected(expected_text)
    except ParseError as e:
        return [f"README output block is not JSON (with `...`): {e}"]
    try:
        actual = parse_actual(actual_text)
    except ValueError as e:
        return [f"output is not JSON: {e}"]
    problems = []
    if len(actual) < len(expected) or (len(actual) > len(expected) and not expected.open):
        problems.append(f"expected {len(expected)} JSON document(s), got {len(actual)}")
    for n, (e, a) in enumerate(zip(expected, actual)):
        problems += match(e, a, f"$[{n}]" if len(expected) > 1 else "$")
    return problems


def match_lines(expected_text: str, actual_text: str) -> list[str]:
    """Line by line; an expected line `...` stands for any number of lines."""
    want = [line.rstrip() for line in expected_text.split("\n") if line.strip()]
    got = [line.rstrip() for line in actual_text.split("\n") if line.strip()]

    def ok(w: int, g: int) -> bool:
        if w == len(want):
            return g == len(got)
        if want[w].strip() in ("...", "…"):
            return any(ok(w + 1, k) for k in range(g, len(got) + 1))
        return g < len(got) and want[w] == got[g] and ok(w + 1, g + 1)

    return [] if ok(0, 0) else ["the lines differ"]


# ------------------------------------------------------------------ running


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float


def run_shell(script: str, timeout: float = COMMAND_TIMEOUT, cwd: str | None = None) -> Result:
    started = time.monotonic()
    try:
        p = subprocess.run(
            ["bash", "-c", script],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"timed out after {timeout:.0f} s"
        rc = -1
    return Result(rc, out, err, time.monotonic() - started)


def run_argv(argv: list[str], stdin: str | None = None, timeout: float = COMMAND_TIMEOUT) -> Result:
    started = time.monotonic()
    try:
        p = subprocess.run(
            argv,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, err = -1, f"timed out after {timeout:.0f} s"
    return Result(rc, out, err, time.monotonic() - started)


def indent(text: str, prefix: str = "      ") -> str:
    return "\n".join(prefix + line for line in text.rstrip("\n").split("\n"))


class Report:
    """Counts checks and prints one line each; buffered=True keeps the lines
    for print_buffered (checks run in parallel print in order)."""

    def __init__(self, buffered: bool = False) -> None:
        self.passed = 0
        self.failed = 0
        self.buffered = buffered
        self.lines: list[str] = []

    def say(self, line: str) -> None:
        if self.buffered:
            self.lines.append(line)
        else:
            print(line, flush=True)

    def print_buffered(self) -> None:
        print("\n".join(self.lines), flush=True)
        self.lines = []

    def ok(self, what: str, detail: str = "") -> None:
        self.passed += 1
        self.say(f"  ok    {what}{'  (' + detail + ')' if detail else ''}")

    def fail(self, what: str, why: list[str], result: Result | None = None, expected: str | None = None) -> None:
        self.failed += 1
        self.say(f"  FAIL  {what}")
        for line in why:
            self.say(f"      {line}")
        if result is not None:
            if expected is not None and result.out.strip():
                diff = difflib.unified_diff(
                    expected.rstrip("\n").split("\n"),
                    result.out.rstrip("\n").split("\n"),
                    "README", "actual", lineterm="", n=2,
                )
                self.say("      --- diff (README output block vs actual output) ---")
                self.say(indent("\n".join(diff), "      "))
            elif result.out.strip():
                self.say("      --- stdout ---")
                self.say(indent(result.out))
            if result.err.strip():
                self.say(f"      --- stderr (exit {result.rc}) ---")
                self.say(indent(result.err))


def run_walkthrough(
    readme: str,
    addr: str,
    report: Report,
    section: str = SECTION,
    addresses: list[tuple[re.Pattern[str], str]] | None = None,
    cwd: str | None = None,
) -> None:
    """Runs `section`'s commands with each README address of `addresses`
    (default: 127.0.0.1:50051 and localhost:50051) replaced by the test
    server's, in `cwd`."""
    addresses = addresses or [(README_ADDR_RE, addr)]
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    commands, notes = extract(text, section)
    blocks_with_output = sum(1 for c in commands if c.expected)
    print(
        f'walkthrough: {readme} "{section}": {len(commands)} grpcurl / buf curl commands, '
        f"{blocks_with_output} with an output block",
        flush=True,
    )
    for note in notes:
        print(f"  note  {note}")
    for command in commands:
        what = f"{README_LABEL}:{command.line}  {command.display}"
        if not any(pattern.search(command.script) for pattern, _ in addresses):
            names = ", ".join(pattern.pattern for pattern, _ in addresses)
            report.fail(what, [f"the command names none of {names}; it would not reach the test server"])
            continue
        script = command.script
        for pattern, replacement in addresses:
            script = pattern.sub(replacement, script)
        result = run_shell(script, cwd=cwd)
        expected = command.expected
        fails = expected is not None and expected.text.startswith("ERROR:")
        if fails:
            if result.rc == 0:
                report.fail(what, ["exit status 0 (the README shows an error)"], result)
                continue
            # Compared as the output the README shows.
            result = Result(result.rc, result.err, "", result.seconds)
        elif result.rc != 0:
            report.fail(what, [f"exit status {result.rc} (expected 0)"], result)
            continue
        if expected is None:
            report.ok(what, f"exit 0, {result.seconds:.1f} s")
            continue
        problems = (match_json if expected.kind == "json" else match_lines)(expected.text, result.out)
        if problems:
            report.fail(
                what,
                [f"output does not match the {expected.kind} block at {README_LABEL}:{expected.line}:"]
                + ["  " + p for p in problems],
                result,
                expected.text,
            )
        else:
            report.ok(what, f"matches {README_LABEL}:{expected.line}, {result.seconds:.1f} s")


# ------------------------------------------------------ reflection contract


def lookup(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, list):
            doc = doc[int(part)] if part.isdigit() and int(part) < len(doc) else KeyError
        elif isinstance(doc, dict):
            doc = doc.get(part, KeyError)
        else:
            doc = KeyError
        if doc is KeyError:
            return KeyError
    return doc


def expect(docs: list[Any], count: int | None = None, **paths: Any) -> list[str]:
    """Checks the documents: their number, and values at dotted paths
    ('0.systemHealth.status'; a value of ... only requires presence)."""
    problems = []
    if count is not None and len(docs) != count:
        problems.append(f"expected {count} response message(s), got {len(docs)}")
    for path, want in paths.items():
        got = lookup(docs, path.replace("__", "."))
        if got is KeyError:
            problems.append(f"{path.replace('__', '.')}: missing")
        elif want is not ... and got != want:
            problems.append(f"{path.replace('__', '.')}: expected {json.dumps(want)}, got {json.dumps(got)}")
    return problems


@dataclasses.dataclass
class Call:
    method: str  # service/method
    request: str  # JSON, one or more documents
    check: Callable[[list[Any]], list[str]]
    stream_cut: bool = False  # a server stream cut by a short deadline
    fails_with: str | None = None  # the call must fail with this text in its error output


def calls_for(system: str) -> list[Call]:
    """One valid call of every RPC, in an order where each sees the effects
    of the ones before. `system` keeps the two clients' data apart."""
    hc = "vitals.v1.HealthCheckService/"
    return [
        Call("grpc.health.v1.Health/Check", "{}", lambda d: expect(d, 1, **{"0__status": "SERVING"})),
        Call(
            hc + "EvaluateHealth",
            json.dumps({
                "statuses": ["HEALTH_STATUS_UNHEALTHY", "HEALTH_STATUS_UNHEALTHY", "HEALTH_STATUS_HEALTHY"],
                "thresholds": {"window": {"window_size": 3, "degraded_min_failure_count": 1,
                                          "unhealthy_min_failure_count": 2}},
            }),
            lambda d: expect(d, 1, **{"0__status": "HEALTH_STATUS_UNHEALTHY",
                                      "0__evaluation__failuresInWindow": 2}),
        ),
        Call(
            hc + "ConfigureCheck",
            json.dumps({
                "system_id": system, "check_id": "db", "enabled": True,
                "thresholds": {"consecutive": {"healthy_min_success_count": 1, "degraded_min_failure_count": 1,
                                               "unhealthy_min_failure_count": 3}},
            }),
            lambda d: expect(d, 1, **{"0__check__checkId": "db", "0__check__enabled": True,
                                      "0__systemHealth__systemId": system}),
        ),
        Call(
            hc + "SubmitRun",
            json.dumps({
                "run_id": f"{system}-1", "system_id": system, "check_id": "db",
                "status": "HEALTH_STATUS_UNHEALTHY", "latency": "0.250s", "message": "connection refused",
            }),
            lambda d: expect(d, 1, **{"0__run__runId": f"{system}-1",
                                      "0__systemHealth__status": "HEALTH_STATUS_DEGRADED",
                                      "0__transition__toStatus": "HEALTH_STATUS_DEGRADED",
                                      "0__transition__sequence": ...}),
        ),
        Call(
            hc + "GetSystemHealth",
            json.dumps({"system_id": system}),
            lambda d: expect(d, 1, **{"0__systemHealth__status": "HEALTH_STATUS_DEGRADED",
                                      "0__systemHealth__checks__0__checkId": "db"}),
        ),
        Call(
            hc + "ListRuns",
            json.dumps({"system_id": system, "check_id": "db", "page_size": 10}),
            lambda d: expect(d, 1, **{"0__runs__0__runId": f"{system}-1",
                                      "0__runs__0__message": "connection refused"})
            + ([] if len(lookup(d, "0.runs") or []) == 1 else ["expected exactly 1 run"]),
        ),
        Call(
            hc + "ListTransitions",
            json.dumps({"system_id": system, "page_size": 10}),
            lambda d: expect(d, 1, **{"0__transitions__0__systemId": system,
                                      "0__transitions__0__toStatus": "HEALTH_STATUS_DEGRADED"})
            + ([] if len(lookup(d, "0.transitions") or []) == 1 else ["expected exactly 1 transition"]),
        ),
        Call(
            hc + "WatchTransitions",
            json.dumps({"system_id": system, "after_sequence": 0}),
            lambda d: expect(d, 1, **{"0__transition__systemId": system,
                                      "0__transition__toStatus": "HEALTH_STATUS_DEGRADED"}),
            stream_cut=True,
        ),
        Call(
            hc + "ListSystems",
            json.dumps({"system_id_prefix": system, "page_size": 10}),
            lambda d: expect(d, 1, **{"0__systems__0__systemId": system, "0__systems__0__checkCount": 1}),
        ),
        Call(
            hc + "SetMaintenance",
            json.dumps({
                "system_id": system,
                "ends_at": (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1))
                .strftime("%Y-%m-%dT%H:%M:%SZ"),
                "reason": "walkthrough",
            }),
            lambda d: expect(d, 1, **{"0__window__reason": "walkthrough", "0__systemHealth__inMaintenance": True}),
        ),
        Call(
            hc + "ClearMaintenance",
            json.dumps({"system_id": system}),
            lambda d: expect(d, 1, **{"0__cleared": 1, "0__systemHealth__systemId": system}),
        ),
        Call(
            hc + "GetUptime",
            json.dumps({"system_id": system, "window": "3600s"}),
            lambda d: expect(d, 1, **{"0__systemId": system, "0__unhealthy": "0s", "0__degraded": ...}),
        ),
        Call(
            hc + "ConfigureSystem",
            json.dumps({"system_id": system, "depends_on": [f"{system}-db"]}),
            lambda d: expect(d, 1, **{"0__systemHealth__dependsOn__0": f"{system}-db"}),
        ),
        Call(
            hc + "DeleteCheck",
            json.dumps({"system_id": system, "check_id": "db"}),
            lambda d: expect(d, 1, **{"0__deleted": True, "0__transition__checkDeleted": True}),
        ),
        Call(
            hc + "DeleteSystem",
            json.dumps({"system_id": system}),
            lambda d: expect(d, 1, **{"0__deleted": True}),
        ),
        Call(
            "vitals.v1.LockService/WithLock",
            "\n".join([
                json.dumps({"acquire": {"key": f"{system}-lock", "owner": system, "wait_timeout": "5s"}}),
                json.dumps({"keep_alive": {}}),
                json.dumps({"release": {}}),
            ]) + "\n",
            lambda d: expect(d, 3, **{"0__acquired__fencingToken": ..., "0__acquired__lease": ...,
                                      "1__keptAlive__leaseExpiresAt": ..., "2__released__heldFor": ...}),
        ),
        Call(
            "vitals.v1.LockService/ListLocks",
            json.dumps({"key_prefix": f"{system}-", "page_size": 10}),
            lambda d: expect(d, 1),
        ),
        Call(
            "vitals.v1.LockService/GetLock",
            json.dumps({"key": f"{system}-lock"}),
            lambda d: [],
            fails_with="neither held nor waited for",
        ),
        Call(
            "vitals.v1.LockService/Campaign",
            "\n".join([
                json.dumps({"campaign": {"election": f"{system}-election", "candidate_value": system,
                                         "wait_timeout": "5s"}}),
                json.dumps({"resign": {}}),
            ]) + "\n",
            lambda d: expect(d, 2, **{"0__elected__fencingToken": ..., "1__resigned__heldFor": ...}),
        ),
        Call(
            "vitals.v1.LockService/ObserveLeader",
            json.dumps({"election": f"{system}-election"}),
            lambda d: expect(d, 0),
            stream_cut=True,
        ),
    ]


WATCH_SECONDS = 4  # deadline of a WatchTransitions call: reflection, connect, replay, then a little following


class Client:
    name: str

    def list_services(self, addr: str) -> tuple[list[str], list[str], Result]: ...
    def list_methods(self, addr: str) -> tuple[list[str], list[Result]]: ...
    def call(self, addr: str, call: Call) -> Result: ...
    def cut_ok(self, result: Result) -> bool: ...


class Grpcurl(Client):
    name = "grpcurl (reflection v1alpha)"

    def list_services(self, addr):
        r = run_argv(["grpcurl", "-plaintext", addr, "list"])
        return r.out.split(), ["grpc.reflection.v1alpha.ServerReflection"], r

    def list_methods(self, addr):
        methods, results = [], []
        for service in ("vitals.v1.HealthCheckService", "vitals.v1.LockService"):
            r = run_argv(["grpcurl", "-plaintext", addr, "list", service])
            results.append(r)
            methods += [m.rsplit(".", 1)[0] + "/" + m.rsplit(".", 1)[1] for m in r.out.split()]
        return methods, results

    def call(self, addr, call):
        argv = ["grpcurl", "-plaintext"]
        if call.stream_cut:
            argv += ["-max-time", str(WATCH_SECONDS)]
        return run_argv(argv + ["-d", "@", addr, call.method], stdin=call.request)

    def cut_ok(self, result):
        # grpcurl exits 64 + the status code: 68 is DEADLINE_EXCEEDED.
        return result.rc == 68 and "DeadlineExceeded" in result.err


class BufCurl(Client):
    name = "buf curl (reflection v1)"
    base = ["buf", "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1"]

    def list_services(self, addr):
        r = run_argv(self.base + ["--list-services", f"http://{addr}"])
        return r.out.split(), ["grpc.reflection.v1.ServerReflection"], r

    def list_methods(self, addr):
        r = run_argv(self.base + ["--list-methods", f"http://{addr}"])
        return r.out.split(), [r]

    def call(self, addr, call):
        argv = list(self.base)
        if call.stream_cut:
            argv += ["--timeout", f"{WATCH_SECONDS}s"]
        return run_argv(argv + ["-d", "@-", f"http://{addr}/{call.method}"], stdin=call.request)

    def cut_ok(self, result):
        return result.rc != 0 and "deadline_exceeded" in result.err


def check_client(client: Client, system: str, addr: str, report: Report) -> None:
    want_methods = [f"vitals.v1.HealthCheckService/{m}" for m in HEALTH_METHODS] + [
        f"vitals.v1.LockService/{m}" for m in LOCK_METHODS
    ]
    short = client.name.split(" (")[0]
    report.say(f"walkthrough: {client.name}, no proto files: list and call every RPC")
    services, reflection, r = client.list_services(addr)
    missing = [s for s in SERVICES + reflection if s not in services]
    if r.rc != 0 or missing:
        report.fail(f"{short}: list services", [f"exit {r.rc}; missing: {', '.join(missing) or '-'}"], r)
    else:
        report.ok(f"{short}: list services", ", ".join(services))
    methods, results = client.list_methods(addr)
    missing = [m for m in want_methods if m not in methods]
    bad = [x for x in results if x.rc != 0]
    if bad or missing:
        report.fail(f"{short}: list methods", [f"missing: {', '.join(missing) or '-'}"], bad[0] if bad else results[0])
    else:
        report.ok(f"{short}: list methods", f"all {len(want_methods)} vitals methods")
    for call in calls_for(system):
        what = f"{short}: {call.method}"
        r = client.call(addr, call)
        if call.fails_with is not None:
            if r.rc == 0 or call.fails_with not in r.err + r.out:
                report.fail(what, [f"expected a failure naming {call.fails_with}, got exit {r.rc}"], r)
            else:
                report.ok(what, f"refused with {call.fails_with}")
            continue
        if call.stream_cut:
            if not client.cut_ok(r):
                report.fail(what, [f"expected the stream to be cut by the client's deadline, got exit {r.rc}"], r)
                continue
        elif r.rc != 0:
            report.fail(what, [f"exit status {r.rc} (expected 0)"], r)
            continue
        try:
            docs = parse_actual(r.out)
        except ValueError as e:
            report.fail(what, [f"output is not JSON: {e}"], r)
            continue
        problems = call.check(docs)
        if problems:
            report.fail(what, problems, r)
        else:
            detail = f"{len(docs)} message(s)" + (", stream cut by the client's deadline" if call.stream_cut else "")
            report.ok(what, f"{detail}, {r.seconds:.1f} s")


def check_client_safely(client: Client, system: str, addr: str, report: Report) -> None:
    try:
        check_client(client, system, addr, report)
    except Exception as e:  # noqa: BLE001 - a crash must count as a failure
        report.fail(f"{client.name}: checks crashed", [f"{type(e).__name__}: {e}"])


def run_reflection(addr: str, report: Report) -> None:
    """Both clients at once (each on a system of its own), printed in turn."""
    clients = [(Grpcurl(), "walkthrough-grpcurl"), (BufCurl(), "walkthrough-buf")]
    reports = [Report(buffered=True) for _ in clients]
    threads = [
        threading.Thread(target=check_client_safely, args=(client, system, addr, rep))
        for (client, system), rep in zip(clients, reports)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rep in reports:
        rep.print_buffered()
        report.passed += rep.passed
        report.failed += rep.failed


# ----------------------------------------------------------------- selftest


def selftest() -> int:
    cases: list[tuple[str, str, str, bool]] = [
        # (kind, expected, actual, should match)
        ("json", '{"a": 1}', '{"a": 1}', True),
        ("json", '{"a": 1}', '{"a": 2}', False),
        ("json", '{"a": 1}', '{"a": "1"}', False),
        ("json", '{"a": "..."}', '{"a": {"b": [1]}}', True),
        ("json", '{"a": 1}', '{"a": 1, "b": 2}', False),
        ("json", '{"a": 1,\n ...\n}', '{"a": 1, "b": 2}', True),
        ("json", '{\n ...\n}', "{}", True),
        ("json", '{"a": 1,\n ...\n}', '{"b": 2}', False),
        ("json", '{"a": {"b": true, ...}, ...}', '{"a": {"b": true, "c": 1}, "d": 2}', True),
        ("json", '{"a": {"b": true, ...}}', '{"a": {"b": false}}', False),
        ("json", '{"a": [1, 2]}', '{"a": [1, 2, 3]}', False),
        ("json", '{"a": [1, ...]}', '{"a": [1, 2, 3]}', True),
        ("json", '{"a": 1}\n{"b": 2}', '{"a": 1}\n{"b": 2}', True),
        ("json", '{"a": 1}\n{"b": 2}', '{"a": 1}', False),
        ("json", '{"a": 1}', '{"a": 1}\n{"b": 2}', False),
        ("json", '{"a": 1}\n...', '{"a": 1}\n{"b": 2}', True),
        ("json", '{"a": null}', '{"a": 0}', False),
        ("json", '{"a": "x"}', "not json", False),
        ("lines", "a\nb", "a\nb\n", True),
        ("lines", "a\nb", "a\nc", False),
        ("lines", "a\nb", "a\nb\nc", False),
        ("lines", "a\n...\nd", "a\nb\nc\nd", True),
        ("lines", "a\n...", "a", True),
        ("lines", "a\n...\nd", "a\nb", False),
    ]
    failures = 0
    for kind, expected, actual, should in cases:
        problems = (match_json if kind == "json" else match_lines)(expected, actual)
        if (not problems) != should:
            failures += 1
            print(f"selftest: {kind} {expected!r} vs {actual!r}: expected {'a match' if should else 'a mismatch'}, "
                  f"got {problems or 'a match'}")
    readme = (
        "# x\n\n## Walkthrough\n\ntext\n\n```sh\n# a comment\n"
        "grpcurl -plaintext -d '{}' \\\n  127.0.0.1:50051 a/B\n"
        "grpcurl -d @ 127.0.0.1:50051 a/C <<'EOF'\n{\"x\":1}\n\nEOF\n```\nprose\n"
        '```json\n{"a": "..."}\n```\n\n```bash\nbuf curl http://127.0.0.1:50051/a/D\n```\n'
        "\n## Next\n\n```sh\ngrpcurl 127.0.0.1:50051 list\n```\n"
    )
    try:
        commands, _ = extract(readme)
        got = [(c.display, c.line, c.expected.line if c.expected else None) for c in commands]
        want = [
            ("grpcurl -plaintext -d '{}' 127.0.0.1:50051 a/B", 9, None),
            ("grpcurl -d @ 127.0.0.1:50051 a/C <<'EOF'", 11, 17),
            ("buf curl http://127.0.0.1:50051/a/D", 22, None),
        ]
        if got != want:
            failures += 1
            print(f"selftest: extract: got {got}, want {want}")
        elif commands[1].script.split("\n")[-1] != "EOF" or "\n\n" not in commands[1].script:
            failures += 1
            print(f"selftest: extract: heredoc not kept whole: {commands[1].script!r}")
    except ExtractError as e:
        failures += 1
        print(f"selftest: extract failed: {e}")
    print(f"walkthrough.py selftest: {len(cases) + 1 - failures} of {len(cases) + 1} cases as expected")
    return 1 if failures else 0


# --------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the walkthrough and the reflection checks")
    run.add_argument("--addr", required=True, help="the test server, HOST:PORT")
    run.add_argument("--readme", default="README.md")
    run.add_argument("--skip-reflection", action="store_true", help="only the README walkthrough")
    run.add_argument("--tls-addr", help=f'the TLS test server, HOST:PORT: also run "{TLS_SECTION}"')
    run.add_argument("--probe-addr", help="the TLS test server's probe listener, HOST:PORT")
    run.add_argument("--tls-dir", help="the directory the TLS section's first block ran in")
    ext = sub.add_parser("extract", help="print the commands and their output blocks")
    setup = sub.add_parser("setup", help=f'print the first shell block of "{TLS_SECTION}"')
    setup.add_argument("--readme", default="README.md")
    ext.add_argument("--readme", default="README.md")
    sub.add_parser("selftest", help="test the output matcher and the extraction")
    args = parser.parse_args()
    global README_LABEL
    if getattr(args, "readme", None):
        README_LABEL = args.readme

    if args.cmd == "selftest":
        return selftest()
    if args.cmd == "setup":
        with open(args.readme, encoding="utf-8") as f:
            print(setup_script(f.read()), end="")
        return 0
    if args.cmd == "extract":
        with open(args.readme, encoding="utf-8") as f:
            commands, notes = extract(f.read())
        for note in notes:
            print(f"note: {note}")
        for c in commands:
            out = f" -> {c.expected.kind} block at line {c.expected.line}" if c.expected else " -> exit 0"
            print(f"{README_LABEL}:{c.line}: {c.display}{out}")
        return 0

    report = Report()
    started = time.monotonic()
    try:
        run_walkthrough(args.readme, args.addr, report)
    except (ExtractError, OSError) as e:
        report.fail("reading the README walkthrough", [str(e)])
    if args.tls_addr:
        host, port = args.tls_addr.rsplit(":", 1)
        try:
            run_walkthrough(
                args.readme,
                args.tls_addr,
                report,
                section=TLS_SECTION,
                addresses=[(TLS_ADDR_RE, f"localhost:{port}"), (PROBE_ADDR_RE, args.probe_addr or "")],
                cwd=args.tls_dir,
            )
        except (ExtractError, OSError) as e:
            report.fail(f'reading the README "{TLS_SECTION}"', [str(e)])
    if not args.skip_reflection:
        run_reflection(args.addr, report)
    print(f"walkthrough: {time.monotonic() - started:.1f} s")
    print(f"walkthrough: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


if __name__ == "__main__":
    os.environ.setdefault("NO_COLOR", "1")
    sys.exit(main())
