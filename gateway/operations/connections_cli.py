"""``rabbitgate connections list|kick|ban|unban|add-operator``: the operator's CLI.

It talks to one gateway process's admin listener over HTTP (the endpoints of
``connections_admin.py``), with the operator's token from
``$RABBITGATE_OPERATOR_TOKEN`` or ``--token-file``. urllib, not aiohttp: one
request per run, nothing to gain from an event loop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from gateway.commands import CliError
from gateway.operations import durations
from gateway.operations.connections_admin import OperatorFileError, add_operator


def parse_duration(text: str) -> int:
    """``--for``'s type: a duration as gateway/operations/durations.py reads it
    (the console's too), more than 0 seconds, refused in argparse's one line."""
    try:
        seconds = durations.parse_duration(text)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 600, 10m, 2h or 1d")
    return seconds


def add_connections_commands(commands: Any) -> None:
    top = commands.add_parser(
        "connections", help="list, kick and ban live connections of one gateway process"
    )
    sub = top.add_subparsers(required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--admin-url",
            default=os.environ.get("RABBITGATE_ADMIN_URL", "http://127.0.0.1:9090"),
            help="the gateway process's admin listener (default: $RABBITGATE_ADMIN_URL "
            "or http://127.0.0.1:9090)",
        )
        p.add_argument(
            "--token-file",
            type=Path,
            help="file holding the operator token (default: $RABBITGATE_OPERATOR_TOKEN)",
        )

    listing = sub.add_parser("list", help="the connections of the process, newest last")
    common(listing)
    listing.add_argument("--user")
    listing.add_argument("--address")
    listing.add_argument("--channel")
    listing.add_argument("--json", action="store_true", help="the endpoint's JSON as is")
    listing.set_defaults(run=_list)

    kick = sub.add_parser("kick", help="close a session, or every session of a user (1008)")
    common(kick)
    who = kick.add_mutually_exclusive_group(required=True)
    who.add_argument("--session")
    who.add_argument("--user")
    kick.add_argument("--reason", default="", help="shown to the client in the close frame")
    kick.set_defaults(run=_kick)

    for name, helptext in (
        ("ban", "ban a user or address for a time; closes its connections (4403)"),
        ("unban", "lift an operator's ban"),
    ):
        p = sub.add_parser(name, help=helptext)
        common(p)
        subject = p.add_mutually_exclusive_group(required=True)
        subject.add_argument("--user")
        subject.add_argument("--address")
        if name == "ban":
            p.add_argument("--for", dest="seconds", type=parse_duration, required=True)
        p.add_argument("--reason", default="")
        p.set_defaults(run=_ban if name == "ban" else _unban)

    adder = sub.add_parser("add-operator", help="add an operator; prints its token once")
    adder.add_argument("name")
    adder.add_argument("--file", type=Path, required=True, help="the operators_file")
    adder.set_defaults(run=_add_operator)


def _token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            raise CliError(f"--token-file {args.token_file}: {exc.strerror or exc}") from None
    token = os.environ.get("RABBITGATE_OPERATOR_TOKEN", "").strip()
    if not token:
        raise CliError("no operator token: set RABBITGATE_OPERATOR_TOKEN or pass --token-file")
    return token


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    url = args.admin_url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {_token(args)}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - operator's URL
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise CliError(f"{url}: not found (is operators_file set on that gateway?)") from None
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            message = exc.reason
        raise CliError(f"{url}: {exc.code} {message}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CliError(f"{url}: {reason}") from None


def _list(args: argparse.Namespace) -> int:
    query = {k: v for k in ("user", "address", "channel") if (v := getattr(args, k)) is not None}
    path = "/connections" + ("?" + urllib.parse.urlencode(query) if query else "")
    answer = _call(args, "GET", path)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    for process in answer.get("processes") or [{"process": answer["process"]}]:
        name = _shown(process.get("process"))
        if process.get("answered") is False:
            print(f"process {name}: did not answer; its connections are not listed")
        else:
            count = process.get("connections", len(answer["connections"]))
            print(f"process {name}: {count} connections")
    print("SESSION\tUSER\tADDRESS\tTRANSPORT\tSINCE\tCHANNELS\tBUFFER\tIN\tOUT\tPROCESS")
    for c in answer["connections"]:
        since = c["since"]
        when = (
            datetime.datetime.fromtimestamp(since, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if since
            else "-"
        )
        fill = "-" if c["send_buffer_fill"] is None else f"{c['send_buffer_fill']:.0%}"
        # repr-escaped: a hostile user name cannot move the terminal's cursor.
        user = json.dumps(c["user"])[1:-1]
        channels = ",".join(json.dumps(ch)[1:-1] for ch in c["channels"]) or "-"
        print(
            f"{c['session']}\t{user}\t{c['address']}\t{c['transport']}\t{when}\t{channels}"
            f"\t{fill}\t{c['messages_in']}\t{_counted(c.get('messages_out'))}"
            f"\t{_shown(c.get('process'))}"
        )
    return 0


def _shown(value: object) -> str:
    """Text from the gateway as one terminal-safe cell (JSON-escaped)."""
    return json.dumps(value if isinstance(value, str) else "-")[1:-1]


def _counted(value: object) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def _unreached(answer: Any) -> None:
    """A fleet-wide action that did not reach every process says which, on stderr."""
    missing = [
        _shown(p.get("process"))
        for p in answer.get("processes") or []
        if isinstance(p, dict) and p.get("answered") is False
    ]
    if missing:
        print(f"not reached (did not answer): {', '.join(missing)}", file=sys.stderr)


def _kick(args: argparse.Namespace) -> int:
    body = {"reason": args.reason}
    body.update({"session": args.session} if args.session else {"user": args.user})
    answer = _call(args, "POST", "/connections/kick", body)
    print(f"closed {answer['closed']} connection(s) with {answer['code']} {answer['reason']!r}")
    _unreached(answer)
    return 0


def _subject(args: argparse.Namespace) -> dict[str, str]:
    return (
        {"kind": "user", "key": args.user}
        if args.user
        else {"kind": "address", "key": args.address}
    )


def _ban(args: argparse.Namespace) -> int:
    body = {**_subject(args), "seconds": args.seconds, "reason": args.reason}
    answer = _call(args, "POST", "/connections/ban", body)
    print(f"banned for {args.seconds} s; closed {answer['closed']} connection(s)")
    _unreached(answer)
    return 0


def _unban(args: argparse.Namespace) -> int:
    answer = _call(args, "POST", "/connections/unban", {**_subject(args), "reason": args.reason})
    print("unbanned" if answer["lifted"] else "no operator ban was in force")
    _unreached(answer)
    return 0


def _add_operator(args: argparse.Namespace) -> int:
    try:
        token = add_operator(args.file, args.name)
    except (OperatorFileError, OSError) as exc:
        raise CliError(str(exc)) from None
    print(token)
    return 0
