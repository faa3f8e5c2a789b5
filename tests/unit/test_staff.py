"""The staff file and its roles (gateway/operations/staff.py), the staff settings
(gateway/config.py) and operators' durations (gateway/operations/durations.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomaly.passwords import check_login as check_reviewer
from anomaly.passwords import read_reviewers, set_reviewer
from gateway.config import ConfigError, load_settings, staff_login_settings
from gateway.operations.durations import parse_duration
from gateway.operations.passwords import hash_password
from gateway.operations.staff import (
    CONSOLE_ACT,
    CONSOLE_VIEW,
    REVIEW,
    StaffFileError,
    check_login,
    grants,
    parse_roles,
    read_staff,
    set_member,
)

PASSWORD = "correct horse battery staple"
CHEAP = hash_password(PASSWORD, n=2**4)  # a real scrypt hash, cheap to check in tests


def test_act_implies_view_and_nothing_implies_review() -> None:
    assert grants({CONSOLE_ACT}, CONSOLE_VIEW) and grants({CONSOLE_ACT}, CONSOLE_ACT)
    assert grants({CONSOLE_VIEW}, CONSOLE_VIEW) and not grants({CONSOLE_VIEW}, CONSOLE_ACT)
    assert not grants({CONSOLE_ACT}, REVIEW) and not grants({REVIEW}, CONSOLE_VIEW)
    assert not grants(set(), REVIEW)


def test_roles_are_parsed_and_unknown_ones_named() -> None:
    assert parse_roles(" review, console-act ") == {REVIEW, CONSOLE_ACT}
    assert parse_roles("") == frozenset()
    with pytest.raises(ValueError, match="unknown role 'admin'"):
        parse_roles("review,admin")


def test_a_line_of_the_first_version_keeps_the_review_role_only(tmp_path: Path) -> None:
    path = tmp_path / "staff"
    path.write_text(
        f"# reviewers\nsam:{CHEAP}\n\nolga:{CHEAP}:console-act\nrita:{CHEAP}:review,console-view\n"
    )
    staff = read_staff(path)
    assert staff["sam"].roles == {REVIEW}
    assert staff["olga"].roles == {CONSOLE_ACT}
    assert staff["rita"].roles == {REVIEW, CONSOLE_VIEW}
    # The review page's readers see the reviewers only.
    assert set(read_reviewers(path)) == {"sam", "rita"}


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("olga", "expected name:scrypt$...[:roles]"),
        ("bad name:scrypt$1", "expected name:scrypt$...[:roles]"),
        ("olga:bcrypt$xyz", "expected name:scrypt$...[:roles]"),
        ("olga:scrypt$1$2$3$4$5:console-act,root", "unknown role 'root'"),
    ],
)
def test_a_bad_line_is_one_line_naming_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = tmp_path / "staff"
    path.write_text(f"sam:{CHEAP}\n{line}\n")
    with pytest.raises(StaffFileError) as caught:
        read_staff(path)
    message = str(caught.value)
    assert f"{path}:2:" in message and problem in message and "\n" not in message


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(StaffFileError, match="No such file"):
        read_staff(tmp_path / "nope")


def test_check_login(tmp_path: Path) -> None:
    path = tmp_path / "staff"
    path.write_text(f"olga:{CHEAP}:console-view\nsam:{CHEAP}\n")
    member = check_login(path, "olga", PASSWORD)
    assert member is not None and member.roles == {CONSOLE_VIEW}
    assert check_login(path, "olga", "wrong password") is None
    assert check_login(path, "nobody", PASSWORD) is None
    assert check_login(tmp_path / "missing", "olga", PASSWORD) is None
    # The review page's check: only who holds the review role.
    assert check_reviewer(path, "sam", PASSWORD) and not check_reviewer(path, "olga", PASSWORD)


def test_set_member_writes_roles_and_set_reviewer_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "staff"
    set_member(path, "olga", PASSWORD, frozenset({CONSOLE_ACT}))
    assert read_staff(path)["olga"].roles == {CONSOLE_ACT}
    assert path.stat().st_mode & 0o777 == 0o600
    set_reviewer(path, "olga", PASSWORD)  # a new password and the review page
    assert read_staff(path)["olga"].roles == {CONSOLE_ACT, REVIEW}
    set_reviewer(path, "sam", PASSWORD)
    assert path.read_text().count(":") == 3  # sam's line has no roles field
    with pytest.raises(StaffFileError, match="roles"):
        set_member(path, "x", PASSWORD, frozenset({"root"}))
    with pytest.raises(StaffFileError, match="at least 12"):
        set_member(path, "x", "short")
    with pytest.raises(StaffFileError, match="names are"):
        set_member(path, "<b>", PASSWORD)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("600", 600), ("90s", 90), ("10m", 600), ("2h", 7200), ("1d", 86400), (" 3 H ", 10800)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-5", "1.5h", "10w", "1e3", "９", "10m5s", "h"])
def test_bad_durations_are_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"^duration: ") as caught:
        parse_duration(text)
    assert "\n" not in str(caught.value)


def _load(tmp_path: Path, text: str) -> object:
    config = tmp_path / "gw.yaml"
    config.write_text("jwt: {secret: abc}\n" + text)
    return load_settings(config, environ={})


def test_staff_settings_and_the_old_reviewers_file(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        environ={"RABBITGATE_JWT_SECRET": "x", "RABBITGATE_STAFF_FILE": "/etc/staff"},
    )
    assert staff_login_settings(settings) == (Path("/etc/staff"), 8 * 3600.0)
    old = _load(tmp_path, "anomaly: {reviewers_file: /r, review_session_seconds: 600}\n")
    assert staff_login_settings(old) == (Path("/r"), 600.0)  # type: ignore[arg-type]
    same = _load(tmp_path, "staff: {file: /r}\nanomaly: {reviewers_file: /r}\n")
    assert staff_login_settings(same)[0] == Path("/r")  # type: ignore[arg-type,index]
    none = _load(tmp_path, "")
    assert staff_login_settings(none) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("staff: {file: /a}\nanomaly: {reviewers_file: /b}\n", "name different files"),
        ("staff: {nope: 1}\n", "unknown config key staff.'nope'"),
        ("staff: {session_seconds: 5}\n", "staff.session_seconds must be between 60"),
        ("anomaly: {review_session_seconds: 1e9}\n", "anomaly.review_session_seconds must be"),
    ],
)
def test_bad_staff_settings_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_login_throttle_trusts_the_supervisors_header_only_on_its_unix_socket() -> None:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    from gateway.operations.staff_login import FORWARDED_FOR, login_address

    def request(peer: object, forwarded: str | None) -> object:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda name, default=None: (
            peer if name == "peername" else default
        )
        headers = {FORWARDED_FOR: forwarded} if forwarded is not None else {}
        return make_mocked_request("POST", "/console/login", headers=headers, transport=transport)

    # Over TCP anyone could send the header: the peer address counts.
    assert login_address(request(("203.0.113.9", 5000), "10.0.0.1")) == "203.0.113.9"  # type: ignore[arg-type]
    # On the worker's Unix socket only the supervisor connects: its header names the browser.
    assert login_address(request("", "198.51.100.7")) == "198.51.100.7"  # type: ignore[arg-type]
    assert login_address(request("", None)) == "?"  # type: ignore[arg-type]
