"""``rabbitgate policy check`` and ``rabbitgate policy explain``: policies for operators.

``check [DIR]`` validates a policies folder as the gateway would load it and
prints PolicySet.lint()'s warnings and a summary. ``explain`` shows which rule
decides a subscribe or publish for given claims (or a verified token), and why.

Exit codes:

* 0: ``check``: the set is valid; ``explain``: allowed
* 1: the set is invalid, the folder unreadable, the config, claims, token or
  channel unusable (one line on stderr)
* 2: bad command-line usage
* 3: ``check --strict``: the set is valid but has warnings
* 4: ``explain``: denied
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.auth.principal import Principal
from gateway.auth.tokens import AuthError, TokenVerifier
from gateway.commands import CliError, no_config_hint
from gateway.config import ConfigError, Settings, load_settings
from gateway.policy.conditions import shown
from gateway.policy.rules import PolicyError, PolicySet, load_policy_set
from gateway.protocol.channels import is_valid_channel

EXIT_OK = 0
EXIT_WARNINGS = 3
EXIT_DENIED = 4
MAX_STDIN_TOKEN_BYTES = 64 * 1024  # far above jwt.max_token_bytes, which the verifier enforces

_EXIT_CODES = """exit codes:
  0  check: the set is valid          explain: allowed
  1  invalid set, unreadable folder, bad config, claims, token or channel
  2  bad command-line usage
  3  check --strict: valid, with warnings
  4  explain: denied"""


def add_policy_commands(
    commands: Any, add_config_flag: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add ``policy check`` and ``policy explain`` to the ``rabbitgate`` subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    policy = commands.add_parser(
        "policy",
        help="check a policies folder, or explain a decision",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    actions = policy.add_subparsers(required=True, metavar="ACTION")
    folder_help = "policies folder (default: the policies_dir setting, policies/)"

    check = actions.add_parser(
        "check",
        help="validate a policies folder and print lint warnings",
        description="Validate every *.yaml file of DIR as the gateway loads them; print "
        "warnings (shadowed rules, unusable channels) and a summary.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    add_config_flag(check)
    check.add_argument("dir", nargs="?", metavar="DIR", help=folder_help)
    check.add_argument("--strict", action="store_true", help="exit 3 when there are warnings")
    check.set_defaults(run=_check)

    explain = actions.add_parser(
        "explain",
        help="show which rule decides an action on a channel, and why",
        description="Print the deciding rule (file and line), each of its conditions with "
        "its result, and the verdict.",
        epilog=_EXIT_CODES,
        formatter_class=formatter,
    )
    add_config_flag(explain)
    explain.add_argument("--channel", required=True, help="the channel, e.g. chat.lobby")
    explain.add_argument("--action", required=True, choices=("subscribe", "publish"))
    who = explain.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--claims",
        metavar="JSON",
        help='token claims as a JSON object, e.g. \'{"sub": "alice", "roles": ["member"]}\'',
    )
    who.add_argument(
        "--token",
        metavar="JWT",
        help="a token, verified with the configured jwt settings ('-': read it from stdin)",
    )
    explain.add_argument("dir", nargs="?", metavar="DIR", help=folder_help)
    explain.set_defaults(run=_explain)


# --- check --------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    policies = _load(args)
    warnings = policies.lint()
    for warning in warnings:
        print(f"warning: {_one_line(str(warning))}")
    rules, files = len(policies.rules), len(policies.files)
    print(
        f"{_count(rules, 'rule')} in {_count(files, 'file')}, digest {policies.digest[:12]}, "
        f"{_count(len(warnings), 'warning')}"
    )
    return EXIT_WARNINGS if warnings and args.strict else EXIT_OK


# --- explain ------------------------------------------------------------------


def _explain(args: argparse.Namespace) -> int:
    channel = args.channel
    if not is_valid_channel(channel):
        raise CliError(
            f"--channel {shown(channel)} is not a channel name: 1 to 200 bytes of "
            "dot-separated segments of letters, digits, _ and -"
        )
    if args.claims is not None:
        principal = _principal_from_claims(args.claims)
        policies = _load(args)
    else:
        settings = _settings(args, why="to verify --token", check_jwt=True)
        token = _read_token(args.token)
        policies = _load(args, settings)
        principal = asyncio.run(_verify(settings, token))
    explanation = policies.explain(principal, args.action, channel)
    print(explanation.render())
    return EXIT_OK if explanation.allowed else EXIT_DENIED


def _principal_from_claims(text: str) -> Principal:
    try:
        claims = json.loads(text)
    except ValueError as exc:
        raise CliError(f"--claims is not valid JSON: {exc}") from None
    except RecursionError:
        raise CliError("--claims is not valid JSON: nested too deeply") from None
    if not isinstance(claims, dict):
        raise CliError('--claims must be a JSON object, e.g. \'{"sub": "alice"}\'')
    try:
        return Principal.from_claims(claims)
    except AuthError as exc:
        raise CliError(f"--claims refused: {exc}") from None


def _read_token(token: str) -> str:
    if token == "-":
        token = sys.stdin.read(MAX_STDIN_TOKEN_BYTES)
    return token.strip()


async def _verify(settings: Settings, token: str) -> Principal:
    verifier = TokenVerifier(settings.jwt)
    try:
        await verifier.start()
        return await verifier.verify(token)
    except AuthError as exc:
        # AuthError's message never quotes the token.
        raise CliError(f"token refused: {exc}") from None
    finally:
        await verifier.close()


# --- shared -------------------------------------------------------------------


def _settings(args: argparse.Namespace, *, why: str, check_jwt: bool = False) -> Settings:
    """Only ``--token`` needs the jwt section; the rest read policies_dir alone."""
    try:
        return load_settings(Path(args.config) if args.config else None, check_jwt=check_jwt)
    except ConfigError as exc:
        hint = "; ".join(filter(None, [f"the configuration is read {why}", no_config_hint(args)]))
        raise CliError(f"{exc} ({hint})") from None


def _load(args: argparse.Namespace, settings: Settings | None = None) -> PolicySet:
    if args.dir:
        directory = Path(args.dir)
    else:
        if settings is None:
            settings = _settings(args, why="for policies_dir; give DIR to do without")
        directory = settings.policies_dir
    try:
        return load_policy_set(directory)
    except PolicyError as exc:
        raise CliError(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
