"""The ``ray-worker`` command line (console script; also ``python -m ray_worker.cli``).

This module owns the operator-facing commands:

- ``check``: load a Serve config the way the worker does (environment overrides included),
  then check the API key against Bella-Queue, that every queue is registered, that the
  event-bus Redis answers, and what redelivery of level-1 tasks depends on
  (``process_timeout_s``, the Redis's keyspace events); one ``ok``/``WARN``/``FAIL``/``skip``
  line per check (a ``WARN`` passes but names what to look at: plaintext URLs to other hosts,
  what could not be read), exit 0 only if all pass;
- ``register``: register the config's queues (already registered is fine);
- ``status``: fetch the poller's JSON status (``GET /<route_prefix>``) and summarise it;
- ``serve``, ``emulator``, ``demo``, ``tiny-model``: hand their arguments to those modules'
  ``main`` (``serve``: :mod:`ray_worker.supervise`).

It talks to Bella-Queue only through :class:`~ray_worker.bella.client.QueueClient` and to
Redis through :func:`ray_worker.eventbus.redis_check.ping` and
:func:`~ray_worker.eventbus.redis_check.config_value` (one ``CONFIG GET``; every redis error is
"unknown"), so it never sees httpx or redis errors.
It must not print or log the API key or a Redis password (every line it prints is scrubbed of
both, URLs go through ``protocol.redact_url``), and it must not start Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import SecretStr, ValidationError

from ray_worker.bella.client import QueueClient
from ray_worker.bella.protocol import (
    DEFAULT_ENDPOINT,
    KEYSPACE_EVENTS_SETTING,
    EventBusConfig,
    Level,
    describe_validation,
    keyspace_events_redeliver,
    redact_url,
)
from ray_worker.config import EnvSettings, WorkerAppArgs, load_app_args, plaintext_url_warnings
from ray_worker.errors import (
    AuthenticationError,
    BadRequestError,
    ConfigError,
    EventBusUnavailableError,
    QueueGatewayError,
    WorkerError,
)

__all__ = [
    "DEFAULT_STATUS_URL",
    "Check",
    "fetch_status",
    "format_status",
    "main",
]

DEFAULT_STATUS_URL = "http://127.0.0.1:8000/bella"
"""Where ``serve run`` of a shipped config serves the poller's status (its route_prefix)."""
APIKEY_HINT = "401: check BELLA_QUEUE_APIKEY"

Outcome = Literal["ok", "WARN", "FAIL", "skip"]
"""``WARN`` passes (exit 0) but says what to look at; ``skip``: something before it failed."""


@dataclass(frozen=True)
class Check:
    """One line of a ``check`` or ``register`` report."""

    name: str
    outcome: Outcome
    detail: str

    @property
    def passed(self) -> bool:
        """``ok`` or ``WARN`` (a skipped check did not pass: something before it failed)."""
        return self.outcome in ("ok", "WARN")


# --------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------


_MIN_SCRUB_LEN = 6
"""Shorter secrets are not scrubbed: replacing e.g. "k" everywhere would garble the report,
and no message carries a secret by construction (this is only the second line of defence)."""


def _scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every secret in ``text`` by ``***``."""
    for secret in secrets:
        if len(secret) >= _MIN_SCRUB_LEN:
            text = text.replace(secret, "***")
    return text


def _url_password(url: str | None) -> str:
    if not url:
        return ""
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def _print_checks(checks: Sequence[Check], secrets: Iterable[str]) -> None:
    secrets = list(secrets)
    width = max((len(c.name) for c in checks), default=0)
    for check in checks:
        line = f"{check.outcome:<5} {check.name:<{width}}  {check.detail}"
        print(_scrub(line, secrets))


def _summary(checks: Sequence[Check], what: str) -> int:
    failed = sum(c.outcome == "FAIL" for c in checks)
    skipped = sum(c.outcome == "skip" for c in checks)
    warned = sum(c.outcome == "WARN" for c in checks)
    if not failed and not skipped:
        print(f"all {len(checks)} {what} passed" + (f", {warned} with a warning" if warned else ""))
        return 0
    print(f"{failed} of {len(checks)} {what} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1


def _load_config(path: Path, app: str | None) -> tuple[WorkerAppArgs | None, Check]:
    """The resolved app args, and the ``config`` check line."""
    try:
        args = load_app_args(path, app).resolved()
        models = args.model_ids()
    except (ConfigError, OSError, yaml.YAMLError) as exc:
        return None, Check("config", "FAIL", f"{path}: {exc}")
    except ValidationError as exc:
        return None, Check("config", "FAIL", f"{path}: {describe_validation(exc)}")
    queues = ", ".join(q.name for q in args.queues)
    detail = f"{path}: queues {queues}; model{'s' if len(models) > 1 else ''} {', '.join(models)}"
    return args, Check("config", "ok", detail)


def _apikey() -> tuple[SecretStr | None, Check]:
    try:
        key = EnvSettings().require_apikey()
    except ConfigError as exc:
        return None, Check("api key", "FAIL", str(exc))
    return key, Check("api key", "ok", "BELLA_QUEUE_APIKEY is set")


def _queue_error(err: WorkerError, base_url: str) -> str:
    """A Bella-Queue failure in operator terms (the URL's credentials hidden)."""
    base_url = redact_url(base_url)
    if isinstance(err, AuthenticationError):
        return f"{APIKEY_HINT} ({base_url} rejected the key)"
    if isinstance(err, QueueGatewayError):
        return f"{base_url}: {err.message}"
    if isinstance(err, BadRequestError):
        return (
            f"{base_url} answered HTTP {err.status_code}: {err.message} "
            "(is BELLA_QUEUE_URL the Bella-Queue base URL?)"
        )
    status = getattr(err, "status_code", None)
    if isinstance(status, int):
        return f"{base_url} answered HTTP {status}: {err}"
    message = str(err)
    if base_url not in message:
        message = f"{base_url}: {message}"
    return f"unreachable: {message}"


# --------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------


def _prepare(
    config: Path, app: str | None
) -> tuple[list[Check], list[str], WorkerAppArgs | None, SecretStr | None]:
    """Load the config and the API key: their checks, the secrets to scrub, and both."""
    secrets = [os.environ.get("BELLA_QUEUE_APIKEY", "")]
    args, config_check = _load_config(config, app)
    apikey, key_check = _apikey()
    if apikey is not None:
        secrets.append(apikey.get_secret_value())
    return [config_check, key_check], secrets, args, apikey


def _check_ray_environment(timeout_s: float) -> Check:
    """Whether the app ``serve run`` builds here gets this shell's environment: a Ray already
    running builds it with its own (see ``ray_worker.ray_env``)."""
    from ray_worker.ray_env import CONTRACT, fingerprints, ray_environment, running_ray

    name = "ray environment"
    address = running_ray()
    if address is None:
        return Check(name, "ok", "no Ray to join: `serve run` starts one with this environment")
    try:
        there = ray_environment(address, timeout_s)
    except Exception as err:
        return Check(
            name,
            "WARN",
            f"`serve run` would join the Ray at {address}, which did not answer "
            f"({type(err).__name__}: {err}); its environment is unknown",
        )
    here = fingerprints(os.environ)
    key = "BELLA_QUEUE_APIKEY"
    where = (
        f"`serve run` joins the Ray at {address} and builds the app with that Ray's "
        "environment, not this shell's (README: 'Where the environment is read')"
    )
    if there[key] is None:
        return Check(
            name,
            "FAIL",
            f"{where}, which has no {key}: start that Ray with it (cluster.yaml's "
            "head_start_ray_commands read it from the secret manager)",
        )
    if there[key] != here[key]:
        return Check(name, "FAIL", f"{where}, whose {key} is not this shell's")
    others = [
        f"{n} ({'unset there' if there[n] is None else 'different there'})"
        for n in CONTRACT
        if n != key and there[n] != here[n]
    ]
    if others:
        return Check(
            name,
            "WARN",
            f"{where}; the other checks use this shell's values of {', '.join(others)}",
        )
    return Check(name, "ok", f"the Ray at {address} has this shell's {key} and settings")


async def _check(config: Path, app: str | None, timeout_s: float) -> tuple[list[Check], list[str]]:
    """Run the checks; returns the report lines and the secrets to scrub from them."""
    checks, secrets, args, apikey = _prepare(config, app)
    if apikey is not None:
        checks.append(await asyncio.to_thread(_check_ray_environment, min(timeout_s, 30.0)))
    if args is None or apikey is None:
        return checks, secrets
    base_url = str(args.queue_url)
    bases = list(dict.fromkeys(q.base for q in args.queues))
    eventbus: EventBusConfig | None = None
    reached = False
    try:
        client = QueueClient(
            base_url, apikey, timeout_s=timeout_s, connect_timeout_s=min(5.0, timeout_s)
        )
    except ValueError as exc:
        checks.append(Check("bella-queue", "FAIL", str(exc)))
        checks += [Check(f"queue {b}", "skip", "no usable Bella-Queue URL") for b in bases]
    else:
        async with client:
            try:
                eventbus = await client.eventbus()
            except WorkerError as err:
                checks.append(Check("bella-queue", "FAIL", _queue_error(err, base_url)))
            else:
                reached = True
                secrets.append(_url_password(eventbus.url))
                checks.append(
                    Check(
                        "bella-queue",
                        "ok",
                        f"{redact_url(base_url)} answered GET /v1/queue/eventbus",
                    )
                )
            for base in bases:
                checks.append(await _check_queue(client, base, args, config, reached, base_url))
    bus_check, bus = await _check_eventbus(args, eventbus, timeout_s, secrets)
    checks.append(bus_check)
    checks.append(await _check_redelivery(args, bus if bus_check.passed else None, timeout_s))
    checks += [
        Check("plaintext", "WARN", warning)
        for warning in plaintext_url_warnings(
            queue_url=base_url, eventbus_url=bus.url if bus is not None else None
        )
    ]
    return checks, secrets


async def _check_queue(
    client: QueueClient, base: str, args: WorkerAppArgs, config: Path, reached: bool, base_url: str
) -> Check:
    name = f"queue {base}"
    if not reached:
        return Check(name, "skip", "needs the bella-queue check to pass")
    levels = ", ".join(q.name for q in args.queues if q.base == base)
    try:
        meta = await client.metadata(base)
    except WorkerError as err:
        return Check(name, "FAIL", _queue_error(err, base_url))
    if not meta:
        return Check(
            name,
            "FAIL",
            f"not registered on Bella-Queue (run: ray-worker register --config {config})",
        )
    return Check(name, "ok", f"registered ({levels}), endpoint {meta.get('endpoint', '?')}")


@dataclass(frozen=True)
class _EventBus:
    """The event-bus Redis the worker would use, and where its URL came from."""

    url: str
    source: str
    reported: bool
    """The URL ``GET /v1/queue/eventbus`` reported: the Redis that holds the queues (protocol
    §1.2). An override may name another address of it, or another Redis."""


async def _check_eventbus(
    args: WorkerAppArgs, eventbus: EventBusConfig | None, timeout_s: float, secrets: list[str]
) -> tuple[Check, _EventBus | None]:
    # Imported here: the publisher module imports Ray Serve, slow to load for a CLI.
    from ray_worker.eventbus.redis_check import ping

    name = "event bus"
    if os.environ.get("BELLA_EVENTBUS_URL"):
        source = "BELLA_EVENTBUS_URL"
    elif args.eventbus_url:
        source = "eventbus_url of the config"
    elif eventbus is not None:
        source = "reported by GET /v1/queue/eventbus"
    else:
        return Check(
            name, "skip", "no Redis URL: set BELLA_EVENTBUS_URL or pass the bella-queue check"
        ), None
    url = args.eventbus_url or (eventbus.url if eventbus is not None else "")
    bus = _EventBus(url, source, reported=args.eventbus_url is None)
    secrets.append(_url_password(url))
    shown = redact_url(url)
    try:
        await ping(url, timeout_s)
    except EventBusUnavailableError as err:
        hint = ""
        if args.eventbus_url is None:
            hint = " (set BELLA_EVENTBUS_URL when the reported URL is not reachable from here)"
        return Check(name, "FAIL", f"{err} ({source}){hint}"), bus
    return Check(name, "ok", f"{shown} answered PING ({source})"), bus


async def _check_redelivery(args: WorkerAppArgs, bus: _EventBus | None, timeout_s: float) -> Check:
    """What Bella-Queue's redelivery of level-1 tasks needs (protocol §2.5): a
    ``process_timeout_s`` sent with the takes, and expired-key events on its Redis."""
    name = "redelivery"
    offline = [q.name for q in args.queues if q.level == Level.OFFLINE]
    if not offline:
        return Check(name, "ok", "no level-1 queue: no task is left for redelivery")
    poller = args.poller
    if poller.process_timeout_s == 0:
        return Check(
            name,
            "FAIL",
            f"poller.process_timeout_s is 0: Bella-Queue never redelivers a task of "
            f"{', '.join(offline)}, so a level-1 task cut short by a stop is answered 503 "
            "instead of left for redelivery, and the tasks of a crashed worker are lost "
            "(set it above the longest run, e.g. 900)",
        )
    retries = "unlimited" if poller.process_max_retries < 0 else poller.process_max_retries
    sent = f"process_timeout_s {poller.process_timeout_s}, process_max_retries {retries}"
    if bus is None:
        return Check(name, "skip", f"{sent}; Redis keyspace events not read: needs the event bus")
    shown = redact_url(bus.url)
    from ray_worker.eventbus.redis_check import config_value

    flags, why = await config_value(bus.url, KEYSPACE_EVENTS_SETTING, timeout_s)
    needs = (
        f"Bella-Queue's redelivery timer needs {KEYSPACE_EVENTS_SETTING} with E and x (e.g. Ex) "
        "on the Redis that holds its queues"
    )
    if flags is None:
        return Check(name, "WARN", f"{sent}; unknown whether it works: {shown}: {why}; {needs}")
    if keyspace_events_redeliver(flags):
        which = "" if bus.reported else ", if it is the Redis that holds Bella-Queue's queues"
        return Check(
            name,
            "ok",
            f"{sent}; {shown} has {KEYSPACE_EVENTS_SETTING} {flags!r} (expired-key events{which})",
        )
    if bus.reported:
        return Check(
            name,
            "FAIL",
            f"{sent}, but {shown} ({bus.source}, the Redis that holds the queues) has "
            f"{KEYSPACE_EVENTS_SETTING} {flags!r}: the server never sees a timeout expire, so "
            f"level-1 tasks cut short by a stop or a crash are never redelivered; {needs} "
            f"(CONFIG SET {KEYSPACE_EVENTS_SETTING} Ex, and in its redis.conf)",
        )
    return Check(
        name,
        "WARN",
        f"{sent}; {shown} ({bus.source}) has {KEYSPACE_EVENTS_SETTING} {flags!r}: if it is the "
        f"Redis that holds Bella-Queue's queues, level-1 tasks cut short by a stop or a crash are "
        f"never redelivered; {needs}",
    )


def _cmd_check(ns: argparse.Namespace) -> int:
    checks, secrets = asyncio.run(_check(ns.config, ns.app, ns.timeout_s))
    _print_checks(checks, secrets)
    return _summary(checks, "checks")


# --------------------------------------------------------------------------------------
# register
# --------------------------------------------------------------------------------------


async def _register(
    config: Path, app: str | None, endpoint: str, timeout_s: float
) -> tuple[list[Check], list[str]]:
    checks, secrets, args, apikey = _prepare(config, app)
    if args is None or apikey is None:
        return checks, secrets
    base_url = str(args.queue_url)
    try:
        client = QueueClient(
            base_url, apikey, timeout_s=timeout_s, connect_timeout_s=min(5.0, timeout_s)
        )
    except ValueError as exc:
        checks.append(Check("bella-queue", "FAIL", str(exc)))
        return checks, secrets
    async with client:
        for base in dict.fromkeys(q.base for q in args.queues):
            checks.append(await _register_one(client, base, endpoint, base_url))
    return checks, secrets


async def _register_one(client: QueueClient, base: str, endpoint: str, base_url: str) -> Check:
    name = f"queue {base}"
    try:
        await client.register(base, endpoint)
    except BadRequestError as err:
        # The server answers a duplicate with 400 "illegal data"; tell it from a bad name.
        try:
            meta = await client.metadata(base)
        except WorkerError:
            meta = None
        if not meta:
            return Check(name, "FAIL", _queue_error(err, base_url))
        existing = meta.get("endpoint", "?")
        note = "" if existing == endpoint else f" (not {endpoint}: Bella-Queue keeps the first)"
        return Check(name, "ok", f"already registered, endpoint {existing}{note}")
    except WorkerError as err:
        return Check(name, "FAIL", _queue_error(err, base_url))
    return Check(name, "ok", f"registered, endpoint {endpoint}")


def _cmd_register(ns: argparse.Namespace) -> int:
    checks, secrets = asyncio.run(_register(ns.config, ns.app, ns.endpoint, ns.timeout_s))
    _print_checks(checks, secrets)
    return _summary(checks, "steps")


# --------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------


class StatusUnavailableError(Exception):
    """The worker's status endpoint could not be read."""


def fetch_status(url: str = DEFAULT_STATUS_URL, timeout_s: float = 5.0) -> dict[str, Any]:
    """``GET`` the poller's status JSON; ``StatusUnavailableError`` with a readable reason."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise StatusUnavailableError(f"{url}: only http:// and https:// URLs are supported")
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise StatusUnavailableError(
            f"{url} answered HTTP {exc.code} (is route_prefix of the app right?)"
        ) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StatusUnavailableError(
            f"cannot reach {url}: {reason} (is the worker running under `serve run`?)"
        ) from None
    try:
        status = json.loads(body)
    except ValueError:
        raise StatusUnavailableError(f"{url} did not answer JSON") from None
    if not isinstance(status, dict):
        raise StatusUnavailableError(f"{url} answered {type(status).__name__}, not an object")
    return status


def _num(value: Any, unit: str = "") -> str:
    if value is None or value == "":
        return "-"
    text = f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
    return f"{text}{unit}"


def _pair(capacity: Mapping[str, Any], key: str) -> str:
    online, offline = capacity.get(f"{key}_online"), capacity.get(f"{key}_offline")
    if online is None and offline is None:
        return "-"
    return f"{_num(online)} online, {_num(offline)} offline"


def format_status(status: Mapping[str, Any]) -> str:
    """A readable summary of the poller's status dict
    (``ray_worker.worker.status.poller_status``)."""
    lines = [
        f"worker     {status.get('state', '?')}"
        f"   strategy {status.get('strategy', '?')}"
        f"   in flight {_num(status.get('in_flight'))}"
    ]
    if status.get("startup_error"):
        lines.append(f"start-up   {status['startup_error']}")
    answered = status.get("answered")
    if isinstance(answered, Mapping):
        counts = ", ".join(f"{k} {v}" for k, v in answered.items())
        lines.append(
            f"answered   {counts}   duplicates {_num(status.get('duplicates'))}"
            f"   complete retries {_num(status.get('complete_retries'))}"
        )
    pools = status.get("pools") or []
    if not pools:
        lines.append("no pools yet")
    for pool in pools:
        if not isinstance(pool, Mapping):
            continue
        cap = pool.get("capacity") or {}
        if not isinstance(cap, Mapping):
            cap = {}
        queues = ", ".join(str(q) for q in pool.get("queues") or [])
        age = pool.get("last_take_age_s")
        last_take = "never" if age is None else f"{_num(age, ' s')} ago"
        if age is not None:
            last_take += (
                f" (asked {_num(pool.get('last_take_size'))},"
                f" got {_num(pool.get('last_take_count'))})"
            )
        lines += [
            f"pool {pool.get('model', '?')} ({queues})",
            f"  state        {pool.get('state', '?')}",
            f"  replicas     {_num(cap.get('replicas'))}",
            f"  in flight    {_pair(cap, 'in_flight')}",
            f"  remaining    {_pair(cap, 'remaining')}",
            f"  target       {_num(cap.get('target'))}",
            f"  last take    {last_take}",
            f"  backoff      {_num(pool.get('backoff_s'), ' s')}",
            f"  last error   {pool.get('last_error') or '-'}",
        ]
    return "\n".join(lines)


def _cmd_status(ns: argparse.Namespace) -> int:
    try:
        status = fetch_status(ns.url, ns.timeout_s)
    except StatusUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if ns.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


# --------------------------------------------------------------------------------------
# Delegated commands and the parser
# --------------------------------------------------------------------------------------


def _run_emulator(argv: list[str]) -> int:
    from ray_worker.emulator import cli as emulator

    return emulator.main(argv)


def _run_demo(argv: list[str]) -> int:
    from ray_worker.dev import demo

    return demo.main(argv)


def _run_tiny_model(argv: list[str]) -> int:
    from ray_worker.dev import tiny_model

    return tiny_model.main(argv)


def _run_serve(argv: list[str]) -> int:
    from ray_worker import supervise

    return supervise.main(argv)


_DELEGATES: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "serve": (_run_serve, "serve run CONFIG, draining on SIGTERM as on Ctrl-C"),
    "emulator": (_run_emulator, "run a local Bella-Queue emulator (python -m ...emulator)"),
    "demo": (_run_demo, "local Redis + emulator + worker on the tiny model, a few tasks"),
    "tiny-model": (_run_tiny_model, "build the tiny random-weight test model"),
}


def _config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, required=True, help="Serve config file, e.g. configs/local.yaml"
    )
    parser.add_argument(
        "--app", default=None, help="application name in the config (default: the first ours)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=10.0, help="timeout of each network call (10)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-worker",
        description="Bella-Queue worker on Ray Serve and vLLM: checks and local tools.",
        epilog=(
            "Environment: BELLA_QUEUE_URL, BELLA_QUEUE_APIKEY, BELLA_QUEUE_QUEUES, "
            "BELLA_EVENTBUS_URL override the config file."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="check config, API key, Ray's environment, queues, event-bus Redis, redelivery",
        description=(
            "Load the config with the environment overrides, then check which environment "
            "the app will be built with (a running Ray that `serve run` would join builds it "
            "with that Ray's own), the API key (GET /v1/queue/eventbus), each queue's "
            "registration, the event-bus Redis "
            "(PING) and what redelivery of level-1 tasks needs (process_timeout_s; the "
            "Redis's notify-keyspace-events). WARN lines pass but name what to look at "
            "(plaintext URLs to other hosts, settings that could not be read). Exit 0 only "
            "if every check passes."
        ),
    )
    _config_flags(check)
    check.set_defaults(run=_cmd_check)

    register = sub.add_parser(
        "register",
        help="register the config's queues on Bella-Queue",
        description="Register each queue of the config; one already registered is fine.",
    )
    _config_flags(register)
    register.add_argument(
        "--endpoint", default=DEFAULT_ENDPOINT, help=f"queue endpoint ({DEFAULT_ENDPOINT})"
    )
    register.set_defaults(run=_cmd_register)

    status = sub.add_parser(
        "status",
        help="summarise the running worker's poller status",
        description="Fetch the poller's status (GET <route_prefix>) and summarise it.",
    )
    status.add_argument(
        "--url", default=DEFAULT_STATUS_URL, help=f"status URL ({DEFAULT_STATUS_URL})"
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON instead")
    status.add_argument("--timeout-s", type=float, default=5.0, help="HTTP timeout (5)")
    status.set_defaults(run=_cmd_status)

    for name, (_, help_text) in _DELEGATES.items():
        # Listed for --help only: main() hands these arguments over before parsing.
        delegate = sub.add_parser(name, help=help_text, add_help=False)
        delegate.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``ray-worker`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in _DELEGATES:
        run, _ = _DELEGATES[args[0]]
        return run(args[1:])
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.command is None:
        parser.print_help()
        return 2
    try:
        code: int = ns.run(ns)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
