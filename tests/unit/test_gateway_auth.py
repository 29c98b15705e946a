"""API keys: hashed only, compared by hash, parsed from metadata strictly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from services.gateway.auth import KeyConfigError, KeyRing, bearer_key, hash_key, load_keys_file
from services.gateway.config import DEFAULT_KEYS_FILE, GatewaySettings
from services.gateway.main import key_ring


def test_the_committed_dev_keys_map_to_their_users() -> None:
    ring = KeyRing.build(load_keys_file(DEFAULT_KEYS_FILE))
    assert ring.user_for("dev-alice-key") == "alice"
    assert ring.user_for("dev-bob-key") == "bob"
    assert ring.user_for("dev-alice-key ") is None
    assert ring.user_for("") is None
    assert "dev-alice-key" not in DEFAULT_KEYS_FILE.read_text().split("key_sha256")[1]


def test_keys_set_in_the_environment_replace_the_public_dev_users(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dev users' keys are in the README: configuring real users must not leave them
    working (they did, added to the file). Naming a file keeps both; "" names none."""
    carol = json.dumps({"carol": hash_key("carol-key")})

    def users(**env: str) -> list[str | None]:
        for name, value in env.items():
            monkeypatch.setenv(f"SMARTLEV_GATEWAY_{name}", value)
        ring = key_ring(GatewaySettings())
        return [ring.user_for(k) for k in ("dev-alice-key", "carol-key")]

    assert users() == ["alice", None]  # nothing configured: the dev users
    assert users(API_KEYS=carol) == [None, "carol"]
    assert users(API_KEYS_FILE=str(DEFAULT_KEYS_FILE)) == ["alice", "carol"]
    assert users(API_KEYS_FILE="") == [None, "carol"]


def test_env_keys_add_to_and_override_the_file() -> None:
    ring = KeyRing.build({"alice": hash_key("a")}, {"alice": hash_key("b"), "carol": hash_key("c")})
    assert [ring.user_for(k) for k in ("a", "b", "c")] == [None, "alice", "carol"]


@pytest.mark.parametrize(
    "entries",
    [{"bad user": hash_key("x")}, {"u": "not-hex"}, {"u": hash_key("x"), "v": hash_key("x")}],
)
def test_bad_key_configuration_is_refused(entries: dict[str, str]) -> None:
    with pytest.raises(KeyConfigError):
        KeyRing.build(entries)


def test_a_keys_file_without_hashes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[users.alice]\nkey = "plain"\n')
    with pytest.raises(KeyConfigError, match="key_sha256"):
        load_keys_file(path)


def test_an_upper_case_digest_is_the_same_key() -> None:
    """sha256 tools print either case (PowerShell's Get-FileHash: upper)."""
    ring = KeyRing.build({"carol": hash_key("carol-key").upper()})
    assert ring.user_for("carol-key") == "carol"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('[users.carol]\nkey_sha256 = "' + "a" * 65 + '"\n', "not a sha256 hex digest"),
        ('[users.carol]\nkey_sha256 = "' + "a" * 63 + '"\n', "not a sha256 hex digest"),
        ("[users.carol]\nkey_sha256 = 42\n", "needs key_sha256"),
        ('users = "carol"\n', "must be a table"),
        ('[users."ca{rol}"]\nkey_sha256 = "' + "a" * 64 + '"\n', "is not 1..64 of"),
        ("[users\n", "keys.toml"),  # not TOML
    ],
)
def test_a_keys_file_that_is_not_usable_is_refused_saying_why(
    tmp_path: Path, text: str, says: str
) -> None:
    """The gateway stops at start with one line, not a traceback, and not later: a user
    id with braces passed the file and failed on every call, where it names a key."""
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeyConfigError, match=re.escape(says)):
        load_keys_file(path)


def test_a_keys_file_that_is_not_there_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="No such file"):
        load_keys_file(tmp_path / "missing.toml")


def test_bearer_key_from_metadata() -> None:
    assert bearer_key([("authorization", "Bearer k1")]) == "k1"
    assert bearer_key([("x-other", "1"), ("authorization", "bearer  k2 ")]) == "k2"
    assert bearer_key([("authorization", "k3")]) is None
    assert bearer_key([("authorization", "Bearer ")]) is None
    assert bearer_key(None) is None
