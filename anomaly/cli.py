"""``rabbitgate alerts ...`` and ``rabbitgate anomaly ...``: review from a terminal,
train from a recording, run the evaluation.

The alert commands work on the alert store under ``anomaly.data_dir`` (the
same file the gateway uses; SQLite lets both write). A review is recorded
first, then published to the alerts exchange if RabbitMQ answers; if it does
not, the gateway's detector publishes it from the store's outbox later.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from anomaly.alerts import RESOLUTIONS, STATUSES, STORE_FILE, AlertStore, ReviewError
from anomaly.settings import SEVERITIES

# Every failure the operator can cause ends as one line (gateway/cli.py prints it).
from gateway.commands import CliError, no_config_hint
from gateway.commands import settings_from_args as _settings
from gateway.config import Settings, staff_login_settings

AddConfigFlag = Callable[[argparse.ArgumentParser], None]


def add_anomaly_commands(commands: Any, add_config_flag: AddConfigFlag) -> None:
    alerts = commands.add_parser("alerts", help="review anomaly alerts")
    sub = alerts.add_subparsers(required=True, metavar="ACTION")

    def command(name: str, help_text: str, run: Callable[[argparse.Namespace], int]) -> Any:
        parser = sub.add_parser(name, help=help_text)
        add_config_flag(parser)
        parser.add_argument("--data-dir", help="anomaly data dir (default: anomaly.data_dir)")
        parser.set_defaults(run=run)
        return parser

    listing = command("list", "list alerts, newest first", _list)
    listing.add_argument(
        "--status",
        default="active",
        choices=[*STATUSES, "active", "all"],
        help="active (default) = open and acknowledged",
    )
    listing.add_argument("--severity", choices=SEVERITIES)
    listing.add_argument("--subject", help="a user or an address")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON alert a line")

    show = command("show", "one alert with its explanation", _show)
    show.add_argument("id")
    show.add_argument("--json", action="store_true")

    ack = command("ack", "acknowledge an open alert", _ack)
    ack.add_argument("id")
    ack.add_argument("--reviewer", required=True)
    ack.add_argument("--note")

    close = command("close", "close an alert with a resolution", _close)
    close.add_argument("id")
    close.add_argument("--resolution", required=True, choices=RESOLUTIONS)
    close.add_argument("--reviewer", required=True)
    close.add_argument("--note", required=True)

    reviewer = command(
        "add-reviewer",
        "add or change a login of the review page and the console (the staff file)",
        _add_reviewer,
    )
    reviewer.add_argument("name")
    reviewer.add_argument("--file", help="default: staff.file (or anomaly.reviewers_file)")
    reviewer.add_argument(
        "--roles",
        help="comma-separated, of review, console-view, console-act"
        " (default: review, and the roles the line had)",
    )
    reviewer.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin"
    )

    detector = commands.add_parser(
        "detector", help="run the fleet's anomaly detector (gateways with anomaly.fleet: true)"
    )
    add_config_flag(detector)
    detector.set_defaults(run=_detector)

    anomaly = commands.add_parser("anomaly", help="train and evaluate the anomaly detector")
    asub = anomaly.add_subparsers(required=True, metavar="ACTION")
    train = asub.add_parser("train", help="train the model from recorded traffic")
    add_config_flag(train)
    train.add_argument("--traffic", required=True, help="JSON lines of traffic events")
    train.add_argument("--out", help="model file (default: <anomaly.data_dir>/model.npz)")
    train.set_defaults(run=_train)

    evaluate = asub.add_parser(
        "evaluate", help="drive a real gateway with normal clients and attacks; print metrics"
    )
    evaluate.add_argument("--window", type=float, default=5.0, help="window seconds (5)")
    evaluate.add_argument("--long-windows", type=int, default=4, help="short windows per long (4)")
    evaluate.add_argument("--warmup-windows", type=int, default=24)
    evaluate.add_argument("--attack-windows", type=int, default=12)
    evaluate.add_argument("--users", type=int, default=50, help="normal users (50)")
    evaluate.add_argument("--attackers", type=int, default=3, help="attackers per kind (3)")
    evaluate.add_argument(
        "--budget", type=float, default=1.0, help="false alerts per 10k subject-hours (1)"
    )
    evaluate.add_argument("--seed", type=int, default=7)
    evaluate.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    evaluate.set_defaults(run=_evaluate)


# --- alerts -----------------------------------------------------------------


def _store(args: argparse.Namespace) -> tuple[AlertStore, Settings]:
    # Reviewing verifies no token: a missing JWT secret is none of its business.
    settings = _settings(args, check_jwt=False)
    data_dir = Path(args.data_dir) if args.data_dir else settings.anomaly.data_dir
    path = data_dir / STORE_FILE
    if not path.exists():
        where = "--data-dir" if args.data_dir else "anomaly.data_dir"
        hint = no_config_hint(args) if not args.data_dir else ""
        raise CliError(
            f"no alert store at {path} (is {where} right?"
            + (f" {hint}, or give --data-dir DIR)" if hint else ")")
        )
    return AlertStore(path), settings


def _list(args: argparse.Namespace) -> int:
    store, _ = _store(args)
    status: Any = {"active": ("open", "acknowledged"), "all": None}.get(args.status, args.status)
    found = store.find(
        status=status, severity=args.severity, subject=args.subject, limit=args.limit
    )
    if args.json:
        for alert in found:
            print(json.dumps(alert))
        return 0
    if not found:
        print("no alerts")
        return 0
    print(f"{'ID':<31} {'CREATED':<20} {'SEVERITY':<8} {'SCORE':>5} {'STATUS':<12} SUBJECT  WHY")
    for alert in found:
        reason = alert["reasons"][0]["text"] if alert["reasons"] else ""
        print(
            f"{alert['id']:<31} {alert['created_at'][:19]:<20} {alert['severity']:<8} "
            f"{alert['score']:>5.2f} {alert['status']:<12} {_subject(alert)}  {_clean(reason)}"
        )
    return 0


def _subject(alert: dict[str, Any]) -> str:
    subject = alert["subject"]
    who = subject.get("user") if subject["kind"] == "user" else subject.get("address")
    return _clean(f"{subject['kind']}:{who}")


def _clean(text: str) -> str:
    """Nothing a user name could smuggle into a terminal (escape sequences)."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _show(args: argparse.Namespace) -> int:
    store, _ = _store(args)
    try:
        alert = store.get(args.id)
    except ReviewError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(alert, indent=2))
        return 0
    subject = alert["subject"]
    lines = [
        f"alert     {alert['id']}  ({alert['severity']}, score {alert['score']:.2f})",
        f"status    {alert['status']}"
        + (f" — {alert['resolution']} by {alert['reviewer']}" if alert["resolution"] else ""),
        f"created   {alert['created_at']}",
        f"subject   {_subject(alert)}"
        + "".join(
            f"  {k}={_clean(v)}"
            for k, v in subject.items()
            if k != "kind" and v is not None and k != subject["kind"]
        ),
        f"window    {alert['window']['start']} .. {alert['window']['end']}",
        "why",
        *[f"  - {_clean(r['text'])}" for r in alert["reasons"]],
        "features",
        *[f"  {name:<20} {value}" for name, value in alert["features"].items()],
        "actions",
        *[f"  - {_clean(a)}" for a in alert["actions"]],
    ]
    if alert.get("note"):
        lines += ["note", f"  {_clean(alert['note'])}"]
    if alert.get("history"):
        lines.append("history")
        lines += [
            f"  {h['at']} {h['status']} by {_clean(h['by'])}"
            + (f": {_clean(h['note'])}" if h.get("note") else "")
            for h in alert["history"]
        ]
    print("\n".join(lines))
    return 0


def _ack(args: argparse.Namespace) -> int:
    return _review(args, "acknowledge")


def _close(args: argparse.Namespace) -> int:
    return _review(args, "close")


def _review(args: argparse.Namespace, action: str) -> int:
    store, settings = _store(args)
    _check_reviewer(args, settings)
    try:
        changed = store.review(
            args.id,
            action,
            args.reviewer,
            resolution=getattr(args, "resolution", None),
            note=args.note,
        )
    except ReviewError as exc:
        raise CliError(str(exc)) from None
    print(f"{changed['id']} is {changed['status']}")
    published = asyncio.run(_publish(store, settings))
    if published is None:
        print(
            "RabbitMQ did not answer: the change is recorded and the gateway publishes it"
            " to the alerts exchange when it next can"
        )
    return 0


def _check_reviewer(args: argparse.Namespace, settings: Settings) -> None:
    """The reviewer recorded must be one the review page would let in: a name
    of ``anomaly.reviewers_file`` (no password here: whoever runs this command
    can write the store anyway; the check keeps the names of the record true)."""
    from anomaly.passwords import ReviewerFileError, read_reviewers

    staff = staff_login_settings(settings)
    path = staff[0] if staff is not None else None
    if path is None:
        hint = no_config_hint(args)
        raise CliError(
            "--reviewer is checked against staff.file (or anomaly.reviewers_file), which is"
            " not set"
            + (f" ({hint})" if hint else "")
            + "; add reviewers with `rabbitgate alerts add-reviewer`"
        )
    try:
        reviewers = read_reviewers(path)
    except OSError as exc:
        raise CliError(f"cannot read the reviewers file {path}: {exc.strerror}") from None
    except ReviewerFileError as exc:
        raise CliError(str(exc)) from None
    if args.reviewer not in reviewers:
        raise CliError(
            f"{_clean(args.reviewer)!r} is not a reviewer in {path}"
            " (add them with `rabbitgate alerts add-reviewer`)"
        )


async def _publish(store: AlertStore, settings: Any) -> int | None:
    from anomaly.exchange import AlertOutbox, AlertPublisher

    publisher = AlertPublisher(settings.amqp_url, settings.anomaly.exchange, connect_timeout=3)
    outbox = AlertOutbox(store, publisher)
    try:
        sent = await outbox.flush()
    except Exception:
        return None
    finally:
        try:
            await publisher.close()
        except Exception:
            pass
    return None if outbox.failures else sent


def _add_reviewer(args: argparse.Namespace) -> int:
    from anomaly.passwords import ReviewerFileError, set_reviewer
    from gateway.operations.staff import parse_roles, set_member

    target = Path(args.file) if args.file else None
    if target is None:
        staff = staff_login_settings(_settings(args, check_jwt=False))
        target = staff[0] if staff is not None else None
    if target is None:
        raise CliError(
            "give --file FILE, or --config FILE with staff.file (or anomaly.reviewers_file) set"
            if not args.config
            else f"give --file FILE, or set staff.file (or anomaly.reviewers_file) in {args.config}"
        )
    roles = None
    if args.roles is not None:
        try:
            roles = parse_roles(args.roles)
        except ValueError as exc:
            raise CliError(f"--roles: {exc}") from None
        if not roles:
            raise CliError("--roles: name at least one role")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise CliError("the passwords differ")
    try:
        if roles is None:
            set_reviewer(target, args.name, password)
        else:
            set_member(target, args.name, password, roles)
    except (ReviewerFileError, OSError) as exc:
        raise CliError(str(exc)) from None
    shown = f" with roles {','.join(sorted(roles))}" if roles is not None else ""
    print(f"reviewer {args.name} saved in {target}{shown}")
    return 0


# --- detector ---------------------------------------------------------------


def _detector(args: argparse.Namespace) -> int:
    """The fleet's detector; a store or model it cannot use is one line, not a loop."""
    from anomaly.fleet import run_detector
    from anomaly.service import check_store
    from gateway.telemetry.logs import configure_logging

    # The detector verifies no token: the gateways do. What it needs (amqp_url,
    # the anomaly section, its store and admin port) still fails in one line.
    settings = _settings(args, check_jwt=False)
    configure_logging(settings.log_level, settings.log_format)
    check_store(settings.anomaly.data_dir / STORE_FILE)  # ConfigError: one line
    try:
        return asyncio.run(run_detector(settings))
    except OSError as exc:  # RabbitMQ unreachable, or the admin port taken, at start
        raise CliError(f"detector cannot start: {exc}") from None


# --- anomaly ----------------------------------------------------------------


def _train(args: argparse.Namespace) -> int:
    from anomaly.model import MODEL_FILE, AnomalyModel
    from anomaly.traffic import baseline_rows, read_events

    settings = _settings(args, check_jwt=False)
    a = settings.anomaly
    try:
        rows = baseline_rows(
            read_events(Path(args.traffic)), a.window_seconds, a.long_window_windows, a.max_subjects
        )
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {args.traffic}: {exc}") from None
    model = AnomalyModel.fit(rows, a.budget(), a.lengths)
    if not model.keys:
        raise CliError(f"{args.traffic} holds too few windows of {a.window_seconds:g} s to train")
    out = Path(args.out) if args.out else a.data_dir / MODEL_FILE
    model.save(out)
    for key in sorted(rows):
        status = f"{len(rows[key])} windows" + ("" if key in model.keys else " (too few: skipped)")
        print(f"{key:<20} {status}")
    print(f"model saved to {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import logging

    from evaluation.live import ScenarioConfig, report, run_scenario

    problem = evaluation_problem(args)
    if problem is not None:
        raise CliError(problem)
    logging.basicConfig(level=logging.ERROR)
    config = ScenarioConfig(
        window_seconds=args.window,
        long_window_windows=args.long_windows,
        warmup_windows=args.warmup_windows,
        attack_windows=args.attack_windows,
        normal_users=args.users,
        attackers_per_kind=args.attackers,
        false_alerts_per_10k_subject_hours=args.budget,
        seed=args.seed,
        amqp_url=args.amqp_url,
    )
    try:
        result = asyncio.run(run_scenario(config, lambda line: print(line, file=sys.stderr)))
    except OSError as exc:
        raise CliError(f"evaluation failed: {exc}") from None
    print(report(result))
    return 0


def evaluation_problem(args: argparse.Namespace) -> str | None:
    """What makes ``anomaly evaluate``'s numbers unusable, in one line, before
    any gateway or client starts (run_scenario would raise a ValueError)."""
    if not args.window > 0:
        return "--window must be positive"
    if args.long_windows < 0:
        return "--long-windows must not be negative (0: no long window)"
    for flag, value in (
        ("--warmup-windows", args.warmup_windows),
        ("--attack-windows", args.attack_windows),
        ("--users", args.users),
    ):
        if value < 1:
            return f"{flag} must be at least 1"
    if args.attackers < 0:
        return "--attackers must not be negative"
    if not args.budget > 0:
        return "--budget must be positive (false alerts per 10k subject-hours)"
    # The attack phase starts and ends on long-window boundaries (run_scenario).
    if args.long_windows and args.attack_windows % args.long_windows:
        return (
            f"--attack-windows {args.attack_windows} must be a multiple of"
            f" --long-windows {args.long_windows}"
        )
    return None
