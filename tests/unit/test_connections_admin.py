"""The pure parts of the operator endpoints and CLI: tokens, durations, close reasons."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.limits.restrictions import Restrictions, Rule
from gateway.operations.connections_admin import (
    OperatorFileError,
    add_operator,
    close_reason,
    hash_token,
    operator_of,
    read_operators,
)
from gateway.operations.connections_cli import parse_duration


def test_a_token_names_its_operator_and_nothing_else_does(tmp_path: Path) -> None:
    path = tmp_path / "operators"
    token = add_operator(path, "olga")
    add_operator(path, "piet")
    operators = read_operators(path)
    assert token not in path.read_text()  # only its hash is stored
    assert operator_of(f"Bearer {token}", operators) == "olga"
    for header in (None, "", token, "Bearer ", "Bearer wrong", f"Basic {token}"):
        assert operator_of(header, operators) is None
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("text", ["olga", "olga sha256:abc", "olga md5:" + "0" * 64, "a b c"])
def test_a_bad_operators_line_is_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / "operators"
    path.write_text(f"# comment\n\n{text}\n")
    with pytest.raises(OperatorFileError, match=r"operators:3: expected NAME sha256:HEX"):
        read_operators(path)


def test_hash_token_is_sha256_hex() -> None:
    assert (
        hash_token("x")
        == "sha256:" + "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-5", "10w", "1.5h", "h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_close_reasons_fit_a_close_frame_in_whole_characters() -> None:
    assert close_reason("kicked", "") == "kicked"
    long = close_reason("kicked", "é" * 200)
    assert len(long.encode()) <= 100 and long.startswith("kicked: é")


def test_operator_bans_survive_the_detectors_sync_and_lift_alone() -> None:
    r = Restrictions()
    r.operator_ban("user", "alice", until=2e9)
    r.replace([Rule("user", "bob", "ban", 2e9)])  # the detector's sync
    assert r.banned("user", "alice", now=1e9) and r.banned("user", "bob", now=1e9)
    assert r.operator_unban("user", "alice") and not r.operator_unban("user", "alice")
    assert not r.banned("user", "alice", now=1e9) and r.banned("user", "bob", now=1e9)
    r.operator_ban("address", "10.0.0.1", until=1e9 + 5)
    assert not r.banned("address", "10.0.0.1", now=1e9 + 6)  # it expires
