"""``rabbitgate policy check`` and ``rabbitgate policy explain``: outputs and exit codes."""

from __future__ import annotations

import io
import json
import secrets
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cli import main
from gateway.config import JwtSettings
from gateway.devtools.devtokens import mint_token

GOOD = """\
version: 1
rules:
  - channel: "chat.{room}"
    exchange: chat
    subscribe: [role:member]
    publish: [role:member]
    limits: {publish: "10/second"}
  - channel: "tenant.{tenant}.feed"
    exchange: feeds
    subscribe: [{all: ["role:member", "claim:tenant={tenant}"]}]
    publish: [nobody]
"""

INBOX = """\
version: 1
rules:
  - channel: "user.{user}.inbox"
    exchange: notify
    subscribe: ["claim:sub={user}"]
    publish: [nobody]
"""

SHADOWED = """\
version: 1
rules:
  - channel: "chat.lobby"
    exchange: lobby
    subscribe: [anyone]
    publish: [role:member]
    limits: {publish: "1/second"}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "policies"
    path.mkdir()
    (path / "10-chat.yaml").write_text(GOOD)
    (path / "20-inbox.yaml").write_text(INBOX)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def explain(
    capsys: pytest.CaptureFixture[str],
    folder: Path,
    channel: str,
    action: str,
    claims: dict[str, Any],
) -> tuple[int, str, str]:
    return run(
        capsys,
        "policy",
        "explain",
        "--channel",
        channel,
        "--action",
        action,
        "--claims",
        json.dumps(claims),
        str(folder),
    )


# --- check --------------------------------------------------------------------


def test_check_a_valid_folder_prints_a_summary_and_exits_0(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    code, out, err = run(capsys, "policy", "check", str(folder))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("3 rules in 2 files, digest ")
    assert lines[0].endswith(", 0 warnings")
    digest = lines[0].split("digest ")[1].split(",")[0]
    assert len(digest) == 12 and int(digest, 16) >= 0


def test_check_warns_about_a_shadowed_rule_and_strict_exits_3(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    (folder / "30-lobby.yaml").write_text(SHADOWED)
    code, out, err = run(capsys, "policy", "check", str(folder))
    assert (code, err) == (0, "")
    warning, summary = out.splitlines()
    assert warning.startswith("warning: 30-lobby.yaml:3: rule 30-lobby.yaml#1 (chat.lobby): ")
    assert "can never match" in warning and "10-chat.yaml:3" in warning
    assert summary.startswith("4 rules in 3 files, ") and summary.endswith(", 1 warning")

    code, out, _ = run(capsys, "policy", "check", "--strict", str(folder))
    assert code == 3
    assert "can never match" in out


def test_check_strict_exits_0_without_warnings(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    assert run(capsys, "policy", "check", "--strict", str(folder))[0] == 0


def test_check_warns_about_channels_nobody_can_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "10-x.yaml").write_text(
        "version: 1\nrules:\n  - channel: x.{y}\n    exchange: x\n    publish: [nobody]\n"
    )
    code, out, _ = run(capsys, "policy", "check", str(tmp_path))
    assert code == 0
    assert "warning: 10-x.yaml:3: rule 10-x.yaml#1 (x.{y}): nobody may subscribe or publish" in out


def test_check_an_empty_folder_warns_that_everything_is_denied(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "policy", "check", str(tmp_path))
    assert code == 0
    assert out.splitlines()[0] == "warning: no rules: every subscribe and publish is denied"
    assert "0 rules in 0 files" in out


def test_a_bad_file_is_one_line_naming_file_line_rule_and_field(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    (folder / "20-inbox.yaml").write_text(
        INBOX + '  - channel: "news.{topic}"\n    exchange: news\n    subscribe: [role: member]\n'
    )
    code, out, err = run(capsys, "policy", "check", str(folder))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1
    assert err.startswith(f"rabbitgate: error: {folder / '20-inbox.yaml'}:9: ")
    assert "rule 2 (news.{topic})" in err
    assert "field 'subscribe'" in err
    assert "role:member" in err  # the hint


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n",  # alias expansion
        "version: 1\nrules: !!python/object/apply:os.system [echo hi]\n",
        "[" * 10_000,
        "version: 1\nrules:\n  - channel: chat.{room}\n    exchange: c\n    sub\x07scribe: []\n",
        "\x00\xff\xfe",
    ],
    ids=["aliases", "python-tag", "deep", "control-char", "binary"],
)
def test_hostile_yaml_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str
) -> None:
    (tmp_path / "10-evil.yaml").write_text(text, errors="surrogateescape")
    code, out, err = run(capsys, "policy", "check", str(tmp_path))
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "10-evil.yaml" in err


def test_a_missing_folder_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "policy", "check", str(tmp_path / "nope"))
    assert (code, out) == (1, "")
    assert (
        err == f"rabbitgate: error: {tmp_path / 'nope'}: cannot read the policies folder: "
        "No such file or directory\n"
    )


def test_without_dir_check_reads_policies_dir_from_the_config(
    capsys: pytest.CaptureFixture[str], folder: Path, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"policies_dir": str(folder), "jwt": {"secret": "s" * 32}}))
    code, out, _ = run(capsys, "policy", "check", "--config", str(config))
    assert code == 0 and out.startswith("3 rules in 2 files")


def test_without_dir_an_unusable_config_is_one_line_with_a_hint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 99999\njwt: {secret: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx}\n")
    code, _, err = run(capsys, "policy", "check", "--config", str(config))
    assert code == 1
    assert err.count("\n") == 1 and "port 99999" in err and "give DIR" in err


# --- explain ------------------------------------------------------------------


def test_explain_allowed_shows_the_rule_the_conditions_and_exits_0(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    code, out, err = explain(
        capsys, folder, "chat.lobby", "publish", {"sub": "alice", "roles": ["member"]}
    )
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "publish 'chat.lobby' as 'alice'",
        "  roles: member; scopes: none",
        "  rule: 10-chat.yaml#1 at 10-chat.yaml:3, channel 'chat.{room}', exchange 'chat'",
        "  bindings: room=lobby",
        "  publish is allowed when any one holds:",
        "    [yes] role:member  (roles: member)",
        "  verdict: ALLOWED (rule 10-chat.yaml#1 chat.{room}: role:member)",
    ]


def test_explain_denied_shows_which_condition_failed_and_exits_4(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    claims = {"sub": "bob", "roles": ["member"], "tenant": "globex"}
    code, out, _ = explain(capsys, folder, "tenant.acme.feed", "subscribe", claims)
    assert code == 4
    assert "rule: 10-chat.yaml#2 at 10-chat.yaml:8" in out
    assert "[yes] role:member" in out
    assert "[no]  claim:tenant={tenant}  (needs 'acme', token has 'globex')" in out
    assert "verdict: DENIED" in out


def test_explain_with_no_matching_rule_is_a_default_deny(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    code, out, _ = explain(capsys, folder, "nothing.here", "subscribe", {"sub": "alice"})
    assert code == 4
    assert "rule: none matches (default deny)" in out


def test_explain_uses_the_second_file(capsys: pytest.CaptureFixture[str], folder: Path) -> None:
    code, out, _ = explain(capsys, folder, "user.alice.inbox", "subscribe", {"sub": "alice"})
    assert code == 0 and "20-inbox.yaml#1 at 20-inbox.yaml:3" in out
    code, out, _ = explain(capsys, folder, "user.alice.inbox", "publish", {"sub": "alice"})
    assert code == 4 and "nobody" in out


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ("{not json", "--claims is not valid JSON"),
        ('["sub", "alice"]', "--claims must be a JSON object"),
        ('"alice"', "--claims must be a JSON object"),
        ("{}", '--claims refused: token lacks the "sub" claim'),
        ('{"sub": "alice", "roles": "admin"}', '"roles" must be a list of strings'),
        ('{"sub": 7}', '"sub" must be'),
        ("[" * 100_000, "--claims is not valid JSON"),
    ],
    ids=["bad-json", "list", "string", "no-sub", "bad-roles", "int-sub", "deep"],
)
def test_bad_claims_are_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], folder: Path, claims: str, message: str
) -> None:
    code, out, err = run(
        capsys,
        "policy",
        "explain",
        "--channel",
        "chat.a",
        "--action",
        "subscribe",
        "--claims",
        claims,
        str(folder),
    )
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("channel", ["chat..a", "chat.*", "", "a" * 201, "chat.a\nforged"])
def test_an_invalid_channel_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], folder: Path, channel: str
) -> None:
    code, out, err = explain(capsys, folder, channel, "subscribe", {"sub": "alice"})
    assert (code, out) == (1, "")
    assert err.count("\n") == 1 and "is not a channel name" in err


def test_explain_on_an_invalid_set_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str], folder: Path
) -> None:
    (folder / "10-chat.yaml").write_text("version: 2\nrules: []\n")
    code, out, err = explain(capsys, folder, "chat.a", "subscribe", {"sub": "alice"})
    assert (code, out) == (1, "")
    assert "10-chat.yaml:1: field 'version'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--channel", "chat.a", "--action", "subscribe"],  # neither --claims nor --token
        ["--channel", "chat.a", "--action", "subscribe", "--claims", "{}", "--token", "x"],
        ["--channel", "chat.a", "--action", "read", "--claims", "{}"],
    ],
    ids=["no-principal", "both", "bad-action"],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["policy", "explain", *argv])
    assert exited.value.code == 2


# --- explain --token ----------------------------------------------------------

ISSUER, AUDIENCE = "cli-test", "rabbitgate"


@pytest.fixture
def jwt_config(tmp_path: Path) -> tuple[Path, JwtSettings]:
    secret = secrets.token_hex(32)
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump({"jwt": {"secret": secret, "issuer": ISSUER, "audience": AUDIENCE}})
    )
    return config, JwtSettings(secret=secret, issuer=ISSUER, audience=AUDIENCE)


def test_explain_with_a_verified_token(
    capsys: pytest.CaptureFixture[str], folder: Path, jwt_config: tuple[Path, JwtSettings]
) -> None:
    config, jwt = jwt_config
    token = mint_token(jwt, sub="carol", roles=["member"], ttl_seconds=60, extra={"tenant": "acme"})
    code, out, err = run(
        capsys,
        "policy",
        "explain",
        "--config",
        str(config),
        "--channel",
        "tenant.acme.feed",
        "--action",
        "subscribe",
        "--token",
        token,
        str(folder),
    )
    assert (code, err) == (0, "")
    assert "subscribe 'tenant.acme.feed' as 'carol'" in out
    assert "[yes] claim:tenant={tenant}" in out


def test_explain_reads_the_token_from_stdin(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    folder: Path,
    jwt_config: tuple[Path, JwtSettings],
) -> None:
    config, jwt = jwt_config
    token = mint_token(jwt, sub="dave", roles=[], ttl_seconds=60)
    monkeypatch.setattr("sys.stdin", io.StringIO(token + "\n"))
    code, out, _ = run(
        capsys,
        "policy",
        "explain",
        "--config",
        str(config),
        "--channel",
        "chat.a",
        "--action",
        "publish",
        "--token",
        "-",
        str(folder),
    )
    assert code == 4 and "as 'dave'" in out and "[no]  role:member  (roles: none)" in out


@pytest.mark.parametrize(
    "make",
    [
        lambda jwt: mint_token(jwt, sub="eve", roles=["member"], ttl_seconds=60) + "x",
        lambda jwt: mint_token(
            JwtSettings(secret="f" * 64, issuer=ISSUER, audience=AUDIENCE),
            sub="eve",
            roles=["member"],
            ttl_seconds=60,
        ),
        lambda jwt: mint_token(jwt, sub="eve", roles=["member"], ttl_seconds=-60),
        lambda jwt: "not.a.token",
    ],
    ids=["tampered", "other-key", "expired", "garbage"],
)
def test_an_invalid_token_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
    folder: Path,
    jwt_config: tuple[Path, JwtSettings],
    make: Any,
) -> None:
    config, jwt = jwt_config
    token = make(jwt)
    code, out, err = run(
        capsys,
        "policy",
        "explain",
        "--config",
        str(config),
        "--channel",
        "chat.a",
        "--action",
        "subscribe",
        "--token",
        token,
        str(folder),
    )
    assert (code, out) == (1, "")
    assert err.startswith("rabbitgate: error: token refused: ") and err.count("\n") == 1
    assert token not in err


def test_explain_token_without_a_usable_config_is_one_line(
    capsys: pytest.CaptureFixture[str], folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RABBITGATE_JWT_SECRET", raising=False)
    monkeypatch.delenv("RABBITGATE_CONFIG", raising=False)
    code, _, err = run(
        capsys,
        "policy",
        "explain",
        "--channel",
        "chat.a",
        "--action",
        "subscribe",
        "--token",
        "a.b.c",
        str(folder),
    )
    assert code == 1
    assert err.count("\n") == 1 and "jwt" in err and "to verify --token" in err


def test_the_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["policy", "check", "--help"])
    out = capsys.readouterr().out
    assert "exit codes" in out and "3  check --strict" in out and "4  explain: denied" in out


def test_shipped_policies_pass_check(capsys: pytest.CaptureFixture[str]) -> None:
    shipped = Path(__file__).resolve().parents[2] / "policies"
    code, out, _ = run(capsys, "policy", "check", "--strict", str(shipped))
    assert code == 0, out
    assert textwrap.dedent(out).endswith(", 0 warnings\n")
