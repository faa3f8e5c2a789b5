from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings


def test_defaults_need_a_jwt_key() -> None:
    with pytest.raises(ConfigError, match="jwt"):
        load_settings(environ={})


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        "port: 9000\njwt: {secret: abc, issuer: file}\nlimits: {max_frame_bytes: 10}\n"
    )
    settings = load_settings(
        config,
        environ={"RABBITGATE_JWT_ISSUER": "env", "RABBITGATE_PORT": "9001"},
        overrides={"port": 9002, "tls.enabled": False},
    )
    assert settings.port == 9002
    assert settings.jwt.issuer == "env"
    assert settings.jwt.secret == "abc"
    assert settings.limits.max_frame_bytes == 10
    assert settings.tls.enabled is False
    assert settings.host == "0.0.0.0" and settings.tls.cert_file == Path("certs/server.pem")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("jwt: {algorithms: [none], secret: x}", "not a signing algorithm"),
        ("jwt: {algorithms: [HS256, RS256], secret: x}", "mixes"),
        ("jwt: {algorithms: [RS256]}", "public_key_file or jwt.jwks_url"),
        ("jwt: {algorithms: [], secret: x}", "empty"),
        ("prot: 1\njwt: {secret: x}", "unknown config key 'prot'"),
        ("port: abc\njwt: {secret: x}", "bad value"),
        ("port: 70000\njwt: {secret: x}", "out of range"),
        ("tls: {enabled: maybe}\njwt: {secret: x}", "bad value"),
        ("- a list", "mapping"),
        ("a: [unclosed", "not valid YAML"),
        ("trusted_proxies: [example.com]\njwt: {secret: x}", "trusted_proxies: 'example.com'"),
        ("shutdown_delay_seconds: -1\njwt: {secret: x}", "shutdown_delay_seconds"),
        ("shutdown_delay_seconds: .nan\njwt: {secret: x}", "shutdown_delay_seconds"),
        ("shutdown_delay_seconds: 601\njwt: {secret: x}", "shutdown_delay_seconds"),
    ],
)
def test_refused_configurations(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, environ={})


def test_secret_never_in_repr() -> None:
    settings = load_settings(environ={"RABBITGATE_JWT_SECRET": "topsecretvalue"})
    assert "topsecretvalue" not in repr(settings)


def test_trusted_proxies_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "RABBITGATE_JWT_SECRET": "x",
            "RABBITGATE_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.1",
        }
    )
    assert settings.trusted_proxies == ("10.0.0.0/8", "192.0.2.1")


def test_the_tools_own_variables_are_not_settings() -> None:
    # An operator's shell exports the CLI's token and admin URL; a gateway
    # started from it must not take them for settings (it refused to start).
    settings = load_settings(
        environ={
            "RABBITGATE_JWT_SECRET": "x",
            "RABBITGATE_OPERATOR_TOKEN": "op-token",
            "RABBITGATE_ADMIN_URL": "http://127.0.0.1:9090",
            "RABBITGATE_REINSTALL": "1",
            "RABBITGATE_SCREENSHOTS": "/tmp/shots",
        }
    )
    assert settings.jwt.secret == "x"


def test_an_unknown_variable_is_still_refused() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'operator_tokn'"):
        load_settings(environ={"RABBITGATE_JWT_SECRET": "x", "RABBITGATE_OPERATOR_TOKN": "t"})
