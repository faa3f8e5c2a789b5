"""Mistakes an operator makes with the ``rabbitgate`` command end in one line on
stderr (``rabbitgate: error: ...``), never a traceback: run as the operator runs
it, the installed command in a subprocess."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from anomaly.alerts import STORE_FILE, AlertStore, make_alert
from anomaly.features import FEATURES, SubjectWindow
from anomaly.passwords import set_reviewer

pytestmark = pytest.mark.integration

SECRET = "s" * 64
ROOT = Path(__file__).parents[2]


def command() -> list[str]:
    """The console script pip installed next to this Python, as users run it."""
    script = Path(sys.executable).parent / "rabbitgate"
    if script.exists():
        return [str(script)]
    found = shutil.which("rabbitgate")
    assert found, "rabbitgate is not installed (bash scripts/setup)"
    return [found]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
    env.update(extra)
    return env


def rabbitgate(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=clean_env() if env is None else env,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rabbitgate: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def gateway_config(tmp_path: Path, certs: Any, policies_dir: Path, **more: Any) -> Path:
    config = {
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "sse_port": 0,
        "tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)},
        "policies_dir": str(policies_dir),
        "jwt": {"algorithms": ["HS256"], "secret": SECRET},
        **more,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- serve --------------------------------------------------------------------


def test_the_websocket_port_in_use_is_one_line(
    tmp_path: Path, certs: Any, policies_dir: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = gateway_config(tmp_path, certs, policies_dir, port=port)
        result = rabbitgate("serve", "--config", str(config), "--log-level", "ERROR")
    one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "Address already in use")


def test_a_wrong_broker_password_is_refused_at_once_in_one_line(
    tmp_path: Path, certs: Any, policies_dir: Path
) -> None:
    # A connect timeout far beyond the subprocess timeout: retrying a refused
    # login until it runs out would time this test out.
    config = gateway_config(
        tmp_path,
        certs,
        policies_dir,
        amqp_url="amqp://guest:hunter2-wrong@127.0.0.1:5672/",
        broker_connect_timeout_seconds=600,
    )
    result = rabbitgate("serve", "--config", str(config), timeout=60)
    line = one_line_error(result, "refused the login", "ACCESS_REFUSED")
    assert "hunter2" not in line


def test_a_yaml_syntax_error_names_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: [1\nhost: x\n")
    line = one_line_error(rabbitgate("serve", "--config", str(config)), f"{config}:2:5")
    assert "<unicode string>" not in line


# --- help and version -----------------------------------------------------------


def test_the_top_level_help_lists_every_command() -> None:
    from gateway.cli import _parser

    subparsers = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    names = sorted(subparsers.choices)
    assert len(names) >= 6
    result = rabbitgate("--help")
    assert result.returncode == 0
    description = result.stdout.split("positional arguments")[0]
    listed = result.stdout.split("positional arguments")[1]
    for name in names:
        assert f"\n    {name} " in listed, name
        assert name in description, name  # the one-line summary names them all too


def test_version() -> None:
    result = rabbitgate("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"rabbitgate {version('rabbitgate')}")


# --- commands that need no JWT setting --------------------------------------------


def test_token_ttl_takes_the_durations_every_command_takes(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"jwt": {"algorithms": ["HS256"], "secret": SECRET}}))
    minted = rabbitgate("token", "--config", str(config), "--sub", "alice", "--ttl", "90s")
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(
        minted.stdout.strip(),
        SECRET,
        algorithms=["HS256"],
        audience=None,
        options={"verify_aud": False},
    )
    assert claims["exp"] - claims["iat"] == 90
    for bad in ("1.5h", "-1h", "0", "1y", ""):
        result = rabbitgate("token", "--config", str(config), "--sub", "alice", f"--ttl={bad}")
        one_line_error(result, "--ttl")


def test_policy_explain_with_claims_needs_no_config(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    claims = '{"sub": "alice", "roles": ["member"]}'
    args = ("policy", "explain", "--claims", claims, "--channel", "chat.lobby")
    result = rabbitgate(*args, "--action", "subscribe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "verdict: ALLOWED" in result.stdout
    assert rabbitgate("policy", "check", cwd=tmp_path).returncode == 0


def test_policy_explain_with_a_token_asks_for_the_config(tmp_path: Path) -> None:
    args = ("policy", "explain", "--token", "x.y.z", "--channel", "chat.lobby")
    one_line_error(rabbitgate(*args, "--action", "subscribe", cwd=tmp_path), "jwt", "--config")


def test_add_reviewer_without_a_file_points_at_file_and_config(tmp_path: Path) -> None:
    result = rabbitgate("alerts", "add-reviewer", "sam", "--password-stdin", cwd=tmp_path)
    one_line_error(result, "--file", "--config", "anomaly.reviewers_file")


def test_add_reviewer_with_a_file_needs_no_config(tmp_path: Path) -> None:
    target = tmp_path / "reviewers"
    result = subprocess.run(
        [*command(), "alerts", "add-reviewer", "sam", "--file", str(target), "--password-stdin"],
        input="correct horse battery staple\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    assert target.read_text().startswith("sam:scrypt$")


def test_alerts_list_without_config_points_at_config_and_data_dir(tmp_path: Path) -> None:
    result = rabbitgate("alerts", "list", cwd=tmp_path)
    one_line_error(result, "no alert store", "--config", "--data-dir")


def store_with_alerts(data_dir: Path, count: int) -> list[dict[str, Any]]:
    features = dict.fromkeys(FEATURES, 0.0)
    alerts = []
    for n in range(count):
        window = SubjectWindow(
            "user", f"user{n}", "198.51.100.7", None, 1795000000.0, 1795000060.0, features
        )
        alerts.append(make_alert(window, 0.9, "high", [], now=1795000060.0 + n))
    store = AlertStore(data_dir / STORE_FILE)
    store.add_many(alerts)
    store.close()
    return alerts


def test_alerts_list_with_data_dir_needs_no_config(tmp_path: Path) -> None:
    store_with_alerts(tmp_path, 3)
    result = rabbitgate("alerts", "list", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "user:user2" in result.stdout


def test_alerts_list_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`rabbitgate alerts list --json | head -1`: far more than a pipe holds."""
    store_with_alerts(tmp_path, 2000)
    args = ["alerts", "list", "--json", "--limit", "2000", "--data-dir", str(tmp_path)]
    process = subprocess.Popen(
        [*command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=tmp_path,
    )
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline()
    assert first.startswith(b'{"id"')
    process.stdout.close()  # what head does after its line
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.wait(60) == 141
    assert stderr == ""


# --- alerts ack --reviewer ----------------------------------------------------------


def review_config(tmp_path: Path) -> tuple[Path, Path]:
    data_dir = tmp_path / "anomaly"
    data_dir.mkdir()
    reviewers = tmp_path / "reviewers"
    set_reviewer(reviewers, "sam", secrets.token_urlsafe(16))
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                # Nothing listens there: the review is kept for the gateway to publish.
                "amqp_url": "amqp://guest:guest@127.0.0.1:1/",
                "anomaly": {"data_dir": str(data_dir), "reviewers_file": str(reviewers)},
            }
        )
    )
    return config, data_dir


def test_ack_refuses_a_reviewer_the_review_page_would_not_know(tmp_path: Path) -> None:
    config, data_dir = review_config(tmp_path)
    (alert,) = store_with_alerts(data_dir, 1)
    ack = ("alerts", "ack", alert["id"], "--config", str(config), "--reviewer")
    one_line_error(rabbitgate(*ack, "mallory"), "'mallory' is not a reviewer", "add-reviewer")
    close = ("alerts", "close", alert["id"], "--config", str(config))
    refused = rabbitgate(*close, "--resolution", "benign", "--note", "x", "--reviewer", "eve")
    one_line_error(refused, "'eve' is not a reviewer")
    store = AlertStore(data_dir / STORE_FILE)
    assert store.get(alert["id"])["status"] == "open"
    store.close()

    result = rabbitgate(*ack, "sam")
    assert result.returncode == 0, result.stderr
    assert f"{alert['id']} is acknowledged" in result.stdout


def test_ack_without_a_reviewers_file_says_what_is_missing(tmp_path: Path) -> None:
    (alert,) = store_with_alerts(tmp_path, 1)
    args = ("alerts", "ack", alert["id"], "--data-dir", str(tmp_path), "--reviewer", "sam")
    one_line_error(rabbitgate(*args, cwd=tmp_path), "anomaly.reviewers_file", "--config")


# --- anomaly evaluate -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--attack-windows", "10", "--long-windows", "4"), ("multiple of --long-windows 4",)),
        (("--window", "0"), ("--window must be positive",)),
        (("--warmup-windows", "0"), ("--warmup-windows",)),
        (("--long-windows", "-1"), ("--long-windows",)),
    ],
)
def test_anomaly_evaluate_refuses_inconsistent_window_counts(
    flags: tuple[str, ...], words: tuple[str, ...]
) -> None:
    one_line_error(rabbitgate("anomaly", "evaluate", *flags), *words)
