"""Signed entries (``cachefs.signing``): a producer signs, a consumer that
trusts the key hits; an entry with a byte changed, unsigned, signed by an
untrusted or revoked key, or too old is a miss and counted; two trusted keys
at once (rotation).  Through the tiers (shared entries) and through a server
(action results it stores and serves)."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import grpc
import pytest

from cachefs.engine import Digest, Store, StoreOptions
from cachefs.errors import ConfigError
from cachefs.format.digest import SHA256
from cachefs.protocol import re_pb2
from cachefs.remote import Tier, TierOptions, Tiers
from cachefs.remote._lists import SharedEntry, entry_key
from cachefs.signing import TYPE_URL, Signer, TrustOptions, Verifier
from tests.mounting import cachefs
from tests.reapi import serving
from tests.test_audit import lines_of
from tests.test_remote import Memory
from tests.test_tiers import wait_for


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("alice", "bob", "mallory"):
        path = tmp_path / "keys" / name
        path.parent.mkdir(exist_ok=True)
        result = cachefs("key", "generate", str(path))
        assert len(result.stdout.strip()) == 16
        out[name] = path
    return out


def test_key_generate(tmp_path: Path, keys: dict[str, Path]) -> None:
    alice = keys["alice"]
    assert stat.S_IMODE(alice.stat().st_mode) == 0o600
    assert alice.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert Path(f"{alice}.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    again = cachefs("key", "generate", str(alice), check=False)
    assert again.returncode == 2 and "exists" in again.stderr
    nowhere = tmp_path / "no-such-dir" / "key"
    lost = cachefs("key", "generate", str(nowhere), check=False)
    assert lost.returncode == 3 and f"writing the key {nowhere}: No such file" in lost.stderr
    assert ".tmp-" not in lost.stderr  # the file meant, not a scratch name
    bad = tmp_path / "bad.pub"
    bad.write_text("nonsense\n")
    with pytest.raises(Exception, match="not a PEM public key"):
        TrustOptions(trusted=(bad,)).load()
    with pytest.raises(Exception, match="16 hex digits"):
        TrustOptions(trusted=(Path(f"{alice}.pub"),), revoked=("xyz",)).load()


def _result() -> re_pb2.ActionResult:
    return re_pb2.ActionResult(
        output_files=[
            re_pb2.OutputFile(path="out.o", digest=re_pb2.Digest(hash="ab" * 32, size_bytes=5))
        ],
        exit_code=0,
    )


def test_sign_and_verify(keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    key = Digest(SHA256.hash(b"an action"), 9)
    alice, bob, mallory = (Signer.load(keys[n]) for n in ("alice", "bob", "mallory"))
    pub = {n: Path(f"{keys[n]}.pub") for n in keys}
    verifier = Verifier.load([pub["alice"], pub["bob"]], [])
    signed = alice.sign(key, _result())
    # Other clients see the same result, the signature in auxiliary metadata.
    [packed] = signed.execution_metadata.auxiliary_metadata
    assert packed.type_url == TYPE_URL and signed.output_files == _result().output_files
    assert verifier.check(key, signed) is None
    assert verifier.check(key, bob.sign(key, _result())) is None  # two keys at once
    assert verifier.check(key, _result()) == "unsigned"
    assert verifier.check(key, mallory.sign(key, _result())) == "unknown key"
    assert verifier.check(Digest(SHA256.hash(b"another"), 7), signed) == "tampered"
    changed = re_pb2.ActionResult()
    changed.CopyFrom(signed)
    changed.output_files[0].digest.size_bytes = 6  # one byte of the entry
    assert verifier.check(key, changed) == "tampered"
    assert verifier.figures() == {
        "accepted": 2, "unsigned": 1, "unknown key": 1, "revoked key": 0,
        "tampered": 2, "expired": 0, "from the future": 0,
    }  # fmt: skip
    # Serialized, one byte flipped anywhere in the signed bytes: never accepted.
    raw = bytearray(signed.SerializeToString())
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        other = re_pb2.ActionResult()
        try:
            other.ParseFromString(bytes(flipped))
        except Exception:
            continue
        assert verifier.check(key, other) is not None, i
    revoked = Verifier.load([pub["alice"], pub["bob"]], [alice.key_id.hex()])
    assert revoked.check(key, signed) == "revoked key"
    assert revoked.check(key, bob.sign(key, _result())) is None
    # Re-signing replaces a signature; one signed long ago is too old for a maximum age.
    aged = Verifier.load([pub["alice"]], [], max_age=60)
    now = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: now - 3600 * 10**9)
    old = alice.sign(key, signed)
    monkeypatch.undo()
    assert len(old.execution_metadata.auxiliary_metadata) == 1
    assert aged.check(key, old) == "expired" and aged.check(key, alice.sign(key, old)) is None
    monkeypatch.setattr(time, "time_ns", lambda: now + 3600 * 10**9)
    ahead = alice.sign(key, signed)
    monkeypatch.undo()
    assert verifier.check(key, ahead) == "from the future"
    # An empty execution_metadata signs and verifies like any other.
    empty = _result()
    empty.execution_metadata.SetInParent()
    assert verifier.check(key, alice.sign(key, empty)) is None


def test_shared_entries_through_the_tiers(tmp_path: Path, keys: dict[str, Path]) -> None:
    """A producer's tiers sign the shared entries they put; a consumer's
    take only those its keys signed (a directory's entry names no content
    and needs none)."""
    remote = Memory("mem")
    data = b"x" * 100
    digest = Digest(SHA256.hash(data), len(data))
    pub = {n: Path(f"{keys[n]}.pub") for n in keys}
    options = StoreOptions(fsync=False)
    with (
        Store.open(tmp_path / "a", create=True, options=options) as a,
        Store.open(tmp_path / "b", create=True, options=options) as b,
    ):
        producer, consumer = Tiers(a, [Tier(remote)]), Tiers(b, [Tier(remote)])
        producer.signer = Signer.load(keys["alice"])
        producer.push_entry("team", SharedEntry("d/signed.o", digest, 0o644, 1))
        producer.signer = Signer.load(keys["mallory"])
        producer.push_entry("team", SharedEntry("d/forged.o", digest, 0o644, 1))
        producer.signer = None
        producer.push_entry("team", SharedEntry("d/plain.o", digest, 0o644, 1))
        consumer.verifier = Verifier.load([pub["alice"], pub["bob"]], [])
        assert consumer.find_entry("team", "d/signed.o") == SharedEntry(
            "d/signed.o", digest, 0o644, 1
        )
        assert consumer.find_entry("team", "d/forged.o") is None
        assert consumer.find_entry("team", "d/plain.o") is None
        assert consumer.find_entry("team", "d") == SharedEntry("d", None)
        figures = consumer.verifier.figures()
        assert figures["accepted"] == 1 and figures["unknown key"] == 1 and figures["unsigned"] == 1
        # alice's entry of d/signed.o, put under the key of d/forged.o: tampered.
        moved = re_pb2.ActionResult()
        moved.CopyFrom(remote.actions[entry_key(SHA256, "team", "d/signed.o")])
        moved.output_files[0].path = "d/forged.o"
        remote.actions[entry_key(SHA256, "team", "d/forged.o")] = moved
        consumer._absent.clear()
        assert consumer.find_entry("team", "d/forged.o") is None
        assert consumer.verifier.figures()["tampered"] == 1
        producer.close()
        consumer.close()


def test_a_server_signs_what_it_stores_and_serves_only_what_is_signed(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    pub = {n: f"{keys[n]}.pub" for n in keys}
    signing = ["--sign-key", str(keys["alice"]), "--trust", pub["alice"], "--trust", pub["bob"]]
    store = tmp_path / "store"
    output = os.urandom(1000)
    with serving(store, *signing) as server, server.client() as client:
        client.write(output)
        key = client.digest(b"action")
        client.ac.UpdateActionResult(
            re_pb2.UpdateActionResultRequest(
                action_digest=key,
                action_result=re_pb2.ActionResult(
                    output_files=[re_pb2.OutputFile(path="o", digest=client.digest(output))]
                ),
            )
        )
        got = client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
        assert [a.type_url for a in got.execution_metadata.auxiliary_metadata] == [TYPE_URL]
        as_key = Digest(bytes.fromhex(key.hash), key.size_bytes)
        assert Verifier.load([Path(pub["alice"])], []).check(as_key, got) is None
    # The same store served by one that trusts only bob: alice's entry is a miss.
    with serving(store, "--trust", pub["bob"]) as server, server.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        figures = json.loads(cachefs("stats", "--json", str(store)).stdout)
        assert figures["signatures"]["unknown key"] == 1
    # And with a key revoked.
    with (
        serving(
            store, "--trust", pub["alice"], "--revoked-key", Signer.load(keys["alice"]).key_id.hex()
        ) as server,
        server.client() as client,
    ):
        with pytest.raises(grpc.RpcError) as info:
            client.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=key))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    events = [e for e in lines_of(store / "audit") if e["event"] == "trust.keys"]
    assert len(events) == 3 and events[0]["sign_key"] == Signer.load(keys["alice"]).key_id.hex()


def test_bad_trust_options(tmp_path: Path, keys: dict[str, Path]) -> None:
    store = str(tmp_path / "store")
    for args, words in [
        (["--trust", str(tmp_path / "none.pub")], "none.pub"),
        (["--sign-key", f"{keys['alice']}.pub"], "not a PEM private key"),
        (["--revoked-key", "00" * 8], "go with --trust"),
    ]:
        result = cachefs("serve", store, *args, check=False, timeout=60)
        assert result.returncode != 0 and words in result.stderr, (args, result.stderr)


def test_a_producer_signs_and_consumers_trust_through_a_shared_remote(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    """Three servers on one REAPI tier (a fourth ``cachefs serve``): what a
    client stores in the one that signs with alice's key, a server that trusts
    alice serves; one that trusts only bob does not, and counts why."""
    pub = {n: f"{keys[n]}.pub" for n in keys}
    with serving(tmp_path / "tier") as tier:
        url = f"grpc://{tier.grpc}"
        with (
            serving(tmp_path / "a", "--remote", url, "--sign-key", str(keys["alice"])) as a,
            serving(tmp_path / "b", "--remote", url, "--trust", pub["alice"]) as b,
            serving(tmp_path / "c", "--remote", url, "--trust", pub["bob"]) as c,
        ):
            output = os.urandom(5000)
            with a.client() as client:
                client.write(output)
                action = client.digest(b"an action")
                result = re_pb2.ActionResult(
                    output_files=[re_pb2.OutputFile(path="o", digest=client.digest(output))]
                )
                client.ac.UpdateActionResult(
                    re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result)
                )

            def settled() -> bool:
                remote = json.loads(cachefs("stats", "--json", str(tmp_path / "a")).stdout)[
                    "remote"
                ]
                return bool(remote["queue"] == 0 and remote["shared_settling"] == 0)

            wait_for(settled)
            request = re_pb2.GetActionResultRequest(action_digest=action)
            with b.client() as client:
                got = client.ac.GetActionResult(request)
                assert list(got.output_files) == list(result.output_files)
                assert client.read(client.digest(output)) == output
            with c.client() as client, pytest.raises(grpc.RpcError) as info:
                client.ac.GetActionResult(request)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            refused = json.loads(cachefs("stats", "--json", str(tmp_path / "c")).stdout)
            assert refused["signatures"]["unknown key"] >= 1
            assert refused["signatures"]["accepted"] == 0
        events = [
            e for e in lines_of(tmp_path / "c" / "audit") if e["event"] == "signature.refused"
        ]
        assert events and all(e["reason"] == "unknown key" for e in events)


def test_a_trust_list_in_the_config(tmp_path: Path, keys: dict[str, Path]) -> None:
    config = tmp_path / "cachefs.toml"
    config.write_text(
        '[trust]\nsign_key = "keys/alice"\ntrust = ["keys/alice.pub", "keys/bob.pub"]\n'
        'revoked = ["00112233445566ff"]\nmax_age = 86400\n'
    )
    options = TierOptions.parse(
        [], config, trust=TrustOptions(trusted=(Path(f"{keys['mallory']}.pub"),))
    )
    signer, verifier = options.trust.load()
    assert signer is not None and signer.key_id == Signer.load(keys["alice"]).key_id
    assert verifier is not None and len(verifier.trusted) == 3 and verifier.max_age == 86400
    assert verifier.revoked == {bytes.fromhex("00112233445566ff")}
    config.write_text('[trust]\nkeys = ["x"]\n')
    with pytest.raises(ConfigError, match="unknown key 'keys'"):
        TierOptions.parse([], config)
