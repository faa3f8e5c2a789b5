"""What every command-line module shares: the one-line error, the ``--config``
flag and the settings it names.

``gateway/cli.py`` (the ``rabbitgate`` entry point) gathers the commands of
``gateway/policy/cli.py`` and ``anomaly/cli.py``; those import this module,
never the entry point, so the command modules form no import cycle.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from gateway.config import ConfigError, Settings, load_settings


class CliError(Exception):
    """A failure reported as one line on stderr."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("RABBITGATE_CONFIG"),
        help="YAML config file (default: $RABBITGATE_CONFIG)",
    )


def settings_from_args(
    args: argparse.Namespace,
    overrides: dict[str, Any] | None = None,
    *,
    check_jwt: bool = True,
) -> Settings:
    """The settings of ``--config`` (or the defaults), with ``overrides`` on top.

    ``check_jwt=False`` for commands that verify no token, so that they do not
    fail on a JWT setting they never use. An error says when no config file was
    read, since that is the usual cause.
    """
    try:
        return load_settings(
            Path(args.config) if args.config else None, overrides=overrides, check_jwt=check_jwt
        )
    except ConfigError as exc:
        hint = no_config_hint(args)
        raise ConfigError(f"{exc} ({hint})" if hint else str(exc)) from None


def no_config_hint(args: argparse.Namespace) -> str:
    """What to add to an error about a setting when no config file was read."""
    if getattr(args, "config", None):
        return ""
    return "no config file was read: give --config FILE or set RABBITGATE_CONFIG"
