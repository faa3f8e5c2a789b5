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

from gateway.config import Settings, load_settings


class CliError(Exception):
    """A failure reported as one line on stderr."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=os.environ.get("RABBITGATE_CONFIG"),
        help="YAML config file (default: $RABBITGATE_CONFIG)",
    )


def settings_from_args(
    args: argparse.Namespace, overrides: dict[str, Any] | None = None
) -> Settings:
    """The settings of ``--config`` (or the defaults), with ``overrides`` on top."""
    return load_settings(Path(args.config) if args.config else None, overrides=overrides)
