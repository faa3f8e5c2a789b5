"""Settings that commands meet: YAML errors name the file, SSE can be turned off
from the environment, and commands that verify no token skip the jwt checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings

SECRET = {"RABBITGATE_JWT_SECRET": "s" * 40}


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: [1\nhost: x\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    message = str(raised.value)
    assert message == f"{config}:2:5: not valid YAML: expected ',' or ']', but got ':'"
    assert "<unicode string>" not in message and "\n" not in message


def test_a_bad_character_in_the_config_is_one_line_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: 1\x07\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert str(config) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("value", ["off", "OFF", "", "null", "none"])
def test_rabbitgate_sse_port_can_turn_sse_off(value: str) -> None:
    settings = load_settings(environ={**SECRET, "RABBITGATE_SSE_PORT": value})
    assert settings.sse_port is None


def test_rabbitgate_sse_port_still_takes_a_port() -> None:
    assert load_settings(environ={**SECRET, "RABBITGATE_SSE_PORT": "8445"}).sse_port == 8445
    with pytest.raises(ConfigError, match="sse_port"):
        load_settings(environ={**SECRET, "RABBITGATE_SSE_PORT": "eighty"})


def test_off_does_not_turn_a_string_setting_into_null() -> None:
    environ = {**SECRET, "RABBITGATE_JWT_AUDIENCE": "none"}
    assert load_settings(environ=environ).jwt.audience == "none"


def test_commands_that_verify_no_token_do_not_need_a_jwt_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jwt"):
        load_settings(environ={})
    settings = load_settings(environ={}, check_jwt=False)
    assert settings.jwt.secret is None
    # Everything else is still checked.
    with pytest.raises(ConfigError, match="port"):
        load_settings(environ={"RABBITGATE_PORT": "70000"}, check_jwt=False)
