"""The audit log: hash-chained JSON lines (``format/audit.py``), written by the
store's owner (``engine/_audit.py``) and checked by ``cachefs audit verify``.

A workload's log verifies; a line changed, removed or inserted anywhere but at
the head is found with its position; rotation keeps the chain across files;
a torn last line is cut off and said; the servers' action cache writes and
the admin operations are in it."""

from __future__ import annotations

import errno
import http.client
import json
import os
import threading
from pathlib import Path

import pytest

from cachefs.engine import AuditLog, CachefsError, Store
from cachefs.format.audit import GENESIS, log_files, verify
from cachefs.protocol import re_pb2
from tests.mounting import cachefs
from tests.reapi import serving


def lines_of(directory: Path) -> list[dict[str, object]]:
    return [
        json.loads(line) for path in log_files(directory) for line in path.read_bytes().splitlines()
    ]


def written(directory: Path, count: int, max_size: int = 1 << 20) -> list[Path]:
    log = AuditLog(directory, max_size=max_size)
    for i in range(count):
        log.record("test.event", n=i, who="someone")
    log.close()
    return log_files(directory)


def verify_cli(*paths: Path, partial: bool = False) -> tuple[int, str, str]:
    args = ["audit", "verify", *(["--partial"] if partial else []), *map(str, paths)]
    result = cachefs(*args, check=False)
    return result.returncode, result.stdout, result.stderr


def test_a_log_verifies_and_names_its_head(tmp_path: Path) -> None:
    files = written(tmp_path / "audit", 20)
    lines = lines_of(tmp_path / "audit")
    assert [line["seq"] for line in lines] == list(range(20))
    assert lines[0]["prev"] == GENESIS
    assert {line["event"] for line in lines} == {"test.event"}
    verdict = verify(files)
    assert verdict.intact and verdict.lines == 20 and verdict.head is not None
    assert verdict.head[0] == 19
    code, out, _ = verify_cli(tmp_path / "audit")
    assert code == 0 and "intact: 20 lines in 1 files" in out and verdict.head[1] in out
    assert verify_cli(tmp_path)[0] == 0  # a store stands for its audit directory
    assert oct((tmp_path / "audit" / "audit.log").stat().st_mode & 0o777) == "0o600"


def _edit(path: Path, edit: str, index: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    if edit == "change":
        doc = json.loads(lines[index])
        doc["who"] = "someone else"
        lines[index] = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    elif edit == "remove":
        del lines[index]
    elif edit == "insert":
        forged = dict(json.loads(lines[index]))  # a copy of a line, seq and prev and all
        lines.insert(
            index, json.dumps(forged, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        )
    elif edit == "remove-first":
        del lines[0]
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("edit", "index", "broken_at"),
    [
        ("change", 7, 9),  # line 8 changed: line 9 names the old line 8
        ("change", 0, 2),
        ("remove", 7, 8),  # seq 8 where 7 was next
        ("insert", 7, 9),  # a copy of line 8 at line 8: the original, at 9, repeats seq 7
        ("remove-first", 0, 1),
    ],
)
def test_tampering_is_found_where_it_is(
    tmp_path: Path, edit: str, index: int, broken_at: int
) -> None:
    files = written(tmp_path / "audit", 20)
    _edit(files[0], edit, index)
    verdict = verify(files)
    assert verdict.broken is not None and verdict.broken[:2] == (files[0], broken_at)
    code, _, err = verify_cli(files[0])
    assert code == 1 and f"audit.log:{broken_at}: the chain breaks" in err


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    files = written(tmp_path / "audit", 60, max_size=1000)
    assert len(files) > 3 and files[-1].name == "audit.log"
    assert all(f.stat().st_size < 1000 + 200 for f in files)
    assert verify(files).intact and verify(files).lines == 60
    # Each rotated file is named by its first line's seq.
    for path in files[:-1]:
        assert (
            int(path.name.rsplit(".", 1)[1]) == json.loads(path.read_bytes().splitlines()[0])["seq"]
        )
    # Without the first file the chain does not start at the beginning...
    assert not verify(files[1:]).intact
    assert verify_cli(*files[1:])[0] == 1
    # ... unless asked to take it as it comes.
    assert verify(files[1:], partial=True).intact
    assert verify_cli(*files[1:], partial=True)[0] == 0
    # A file left out in the middle, or files out of order, break it.
    assert not verify([files[0], *files[2:]]).intact
    assert not verify([files[1], files[0], *files[2:]], partial=True).intact


def test_reopened_the_log_goes_on_and_a_torn_line_is_cut_off(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    written(directory, 5)
    with open(directory / "audit.log", "ab") as f:
        f.write(b'{"event":"half a li')  # a crash in the middle of a write
    written(directory, 3)
    lines = lines_of(directory)
    assert [line["seq"] for line in lines] == list(range(9))
    assert lines[5]["event"] == "audit.torn_tail" and lines[5]["bytes"] == 19
    assert verify(log_files(directory)).intact
    # A torn line that nobody cut off breaks the chain.
    with open(directory / "audit.log", "ab") as f:
        f.write(b'{"seq":9')
    verdict = verify(log_files(directory))
    assert verdict.broken is not None and "torn" in verdict.broken[2]


def test_rotation_then_a_restart_continues_from_the_rotated_file(tmp_path: Path) -> None:
    """A new current file (the process died right after a rotation) goes on from
    the last rotated file, not from the start."""
    directory = tmp_path / "audit"
    log = AuditLog(directory, max_size=300)
    for i in range(10):
        log.record("test.event", n=i)
    log.close()
    rotated = log_files(directory)[-2]
    last = json.loads(rotated.read_bytes().splitlines()[-1])["seq"]
    (directory / "audit.log").unlink()
    written(directory, 2)
    assert [line["seq"] for line in lines_of(directory)][-2:] == [last + 1, last + 2]
    assert verify(log_files(directory)).intact


def test_records_from_many_threads_make_one_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", max_size=4000)

    def work(n: int) -> None:
        for i in range(50):
            log.record("test.event", thread=n, i=i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    verdict = verify(log_files(tmp_path / "audit"))
    assert verdict.intact and verdict.lines == 200


def test_an_event_may_not_forge_the_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit")
    with pytest.raises(ValueError, match="may not set"):
        log.record("test.event", seq=1)
    log.close()


def test_verify_errors(tmp_path: Path) -> None:
    code, _, err = verify_cli(tmp_path / "nothing.log")
    assert code == 3 and "no such file" in err
    (tmp_path / "junk.log").write_bytes(b"not json\n")
    code, _, err = verify_cli(tmp_path / "junk.log")
    assert code == 1 and "junk.log:1: the chain breaks: the line is not JSON" in err


def test_servers_and_admin_operations_are_audited(tmp_path: Path) -> None:
    store = tmp_path / "store"
    with serving(store) as server, server.client() as client:
        output = os.urandom(1000)
        client.write(output)
        key = client.digest(b"an action")
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path="out", digest=client.digest(output))]
        )
        client.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=key, action_result=result)
        )
        assert server.http is not None
        host, port = server.http.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        entry = result.SerializeToString()
        http_key = client.digest(b"another action").hash
        conn.request("PUT", f"/ac/{http_key}", body=entry)
        assert conn.getresponse().status == 200
        conn.close()
        cachefs("gc", str(store))  # through the daemon
    cachefs("gc", str(store))  # the store on its own
    events = lines_of(store / "audit")
    kinds = [e["event"] for e in events]
    assert kinds.count("servers.start") == 1 and kinds.count("gc") == 2
    writes = [e for e in events if e["event"] == "ac.write"]
    assert [w["key"] for w in writes] == [key.hash, http_key]
    assert writes[0]["result"] == f"{client.digest(result.SerializeToString()).hash}/{len(entry)}"
    assert all(str(w["by"]).count("127.0.0.1") == 1 for w in writes)
    assert [e["via"] for e in events if e["event"] == "gc"] == ["control", "cli"]
    assert verify_cli(store / "audit")[0] == 0
    with Store.open(store) as opened:
        assert opened.audit.head()[0] == len(events)


def test_a_full_disk_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit")
    log.record("test.event", n=0)
    real = os.write
    calls = []

    def short_then_full(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data)[:10])  # a short write...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(CachefsError, match="audit log"):
        log.record("test.event", n=1)
    monkeypatch.undo()
    log.record("test.event", n=2)
    log.close()
    verdict = verify(log_files(tmp_path / "audit"))
    assert verdict.intact and verdict.lines == 2


def test_a_damaged_last_line_is_named_not_fatal(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    written(directory, 3)
    with open(directory / "audit.log", "ab") as f:
        f.write(b"garbage that is no audit line\n")
    written(directory, 2)  # the log goes on
    verdict = verify(log_files(directory))
    assert verdict.broken is not None and verdict.broken[1] == 4


def test_the_log_where_audit_log_says(tmp_path: Path) -> None:
    store, elsewhere = tmp_path / "store", tmp_path / "var-log-cachefs"
    with serving(store, "--audit-log", str(elsewhere)):
        pass
    assert [e["event"] for e in lines_of(elsewhere)][-1] == "servers.start"
    assert not (store / "audit").exists()
    assert verify_cli(elsewhere)[0] == 0
