"""`rabbitgate serve` refuses bad set-ups with one line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

SECRET = "s" * 64


def serve(
    tmp_path: Path, config: dict[str, Any], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def base_config(certs: Any, policies_dir: Path) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": 0,
        "tls": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)},
        "policies_dir": str(policies_dir),
        "jwt": {"algorithms": ["HS256"], "secret": SECRET},
        "broker_connect_timeout_seconds": 2,
    }


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rabbitgate: error:")]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert SECRET not in result.stderr + result.stdout


def test_a_missing_certificate_is_refused(tmp_path: Path, certs: Any, policies_dir: Path) -> None:
    config = base_config(certs, policies_dir)
    config["tls"]["cert_file"] = str(tmp_path / "nope.pem")
    assert_one_line_refusal(serve(tmp_path, config), "nope.pem")


def test_an_invalid_policy_set_is_refused(tmp_path: Path, certs: Any) -> None:
    folder = tmp_path / "bad-policies"
    folder.mkdir()
    (folder / "10-x.yaml").write_text(
        "version: 1\nrules:\n  - channel: a.{x}\n    exchange: amq.topic\n"
    )
    config = base_config(certs, folder)
    assert_one_line_refusal(serve(tmp_path, config), "10-x.yaml", "exchange")


@pytest.mark.parametrize(
    ("jwt", "words"),
    [
        ({"algorithms": ["none"], "secret": SECRET}, ("none",)),
        ({"algorithms": ["HS256", "RS256"], "secret": SECRET}, ("mixes",)),
        ({"algorithms": ["RS256"]}, ("public_key_file",)),
        ({"algorithms": ["HS256"], "secret": "short"}, ("secret",)),
    ],
)
def test_a_jwt_setting_that_could_accept_bad_tokens_is_refused(
    tmp_path: Path, certs: Any, policies_dir: Path, jwt: dict[str, Any], words: tuple[str, ...]
) -> None:
    config = base_config(certs, policies_dir)
    config["jwt"] = jwt
    assert_one_line_refusal(serve(tmp_path, config), *words)


def test_an_unreachable_broker_is_refused_after_a_bounded_wait(
    tmp_path: Path, certs: Any, policies_dir: Path
) -> None:
    config = base_config(certs, policies_dir)
    config["amqp_url"] = "amqp://guest:hunter2@127.0.0.1:1/"
    result = serve(tmp_path, config, timeout=30)
    assert_one_line_refusal(result, "cannot reach RabbitMQ", "127.0.0.1:1")
    assert "hunter2" not in result.stderr


def test_tls_off_needs_to_be_asked_for(tmp_path: Path, certs: Any, policies_dir: Path) -> None:
    config = base_config(certs, policies_dir)
    config["tls"] = {"enabled": "perhaps"}
    assert_one_line_refusal(serve(tmp_path, config), "tls.enabled")
