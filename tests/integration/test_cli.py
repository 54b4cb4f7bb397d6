"""``ray-worker``: check, register and status against the real emulator, Redis and HTTP; how
``ray-worker serve`` supervises ``serve run`` (real processes, a stand-in for ``serve run``).

``main([...])`` runs in-process (in a helper thread, so its ``asyncio.run`` never touches the
session's event loop) and its output is captured with ``capsys``. Each test sets the
``BELLA_*`` environment itself, so the config's own values are overridden as in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from ray_worker.bella.protocol import keyspace_events_redeliver
from ray_worker.cli import format_status, main
from ray_worker.emulator.server import EmulatorServer
from ray_worker.testing.emulator import EMULATOR_APIKEY, emulator_server
from ray_worker.testing.redis_server import RedisServer, free_port
from ray_worker.testing.waiting import wait_for_sync

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "local.yaml"

SAMPLE_STATUS: dict[str, Any] = {
    "state": "running",
    "startup_error": None,
    "queues": ["demo:0", "demo:1"],
    "strategy": "active_passive",
    "in_flight": 4,
    "pools": [
        {
            "model": "tiny-llama",
            "queues": ["demo:0", "demo:1"],
            "state": "failing",
            "takes": 12,
            "tasks_taken": 30,
            "full_takes": 1,
            "empty_takes": 5,
            "failed_takes": 2,
            "last_take_age_s": 0.012,
            "last_take_size": 16,
            "last_take_count": 0,
            "backoff_s": 0.4,
            "last_error": "QueueUnavailableError: HTTP 502 from POST /v1/queue/take",
            "capacity": {
                "replicas": 2,
                "target": 20,
                "max_num_seqs": 16,
                "in_flight_online": 3,
                "in_flight_offline": 1,
                "remaining_online": 16,
                "remaining_offline": 14,
            },
        }
    ],
    "answered": {"2xx": 25, "4xx": 1, "5xx": 0},
    "duplicates": 0,
    "complete_retries": 2,
}


def run_cli(argv: list[str]) -> int:
    """``main(argv)`` in a fresh thread (its own event loop); returns the exit status."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(main, argv).result(timeout=60)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, emulator: EmulatorServer, unique_queue: str) -> str:
    """The environment of a worker pointed at the emulator, taking ``unique_queue``."""
    for name in ("BELLA_QUEUE_URL", "BELLA_QUEUE_APIKEY", "BELLA_QUEUE_QUEUES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("BELLA_EVENTBUS_URL", raising=False)
    # The session's Ray is not one `serve run` would join (its address file is in its own
    # temp dir): the `ray environment` line says so, whatever the caller's RAY_ADDRESS.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("BELLA_QUEUE_URL", emulator.url)
    monkeypatch.setenv("BELLA_QUEUE_APIKEY", EMULATOR_APIKEY)
    monkeypatch.setenv("BELLA_QUEUE_QUEUES", f"{unique_queue}:0,{unique_queue}:1")
    return unique_queue


def lines_of(text: str) -> dict[str, str]:
    """``{check name: its whole line}`` of a check/register report."""
    out = {}
    for line in text.splitlines():
        outcome, _, rest = line.partition(" ")
        if outcome in ("ok", "WARN", "FAIL", "skip"):
            name = rest.strip().split("  ")[0]
            out[name] = line
    return out


# ---------------------------------------------------------------------------------- check


def test_check_passes_for_registered_queue(
    env: str, capsys: pytest.CaptureFixture[str], redis_server: RedisServer
) -> None:
    assert run_cli(["register", "--config", str(CONFIG)]) == 0
    capsys.readouterr()

    assert run_cli(["check", "--config", str(CONFIG)]) == 0

    out = capsys.readouterr().out
    lines = lines_of(out)
    assert set(lines) == {
        "config",
        "api key",
        "bella-queue",
        f"queue {env}",
        "event bus",
        "redelivery",
        "ray environment",
    }
    # No Ray running that `serve run` would join: it would start one with this environment.
    assert lines["ray environment"].startswith("ok"), out
    assert all(line.startswith("ok ") for line in lines.values()), out
    assert f"{env}:0, {env}:1" in lines[f"queue {env}"]
    assert "/v1/chat/completions" in lines[f"queue {env}"]
    assert "reported by GET /v1/queue/eventbus" in lines["event bus"]
    # configs/local.yaml sends process_timeout_s 300; the test Redis has `Ex` (shown as "xE").
    assert "process_timeout_s 300, process_max_retries 2" in lines["redelivery"]
    assert "notify-keyspace-events 'xE'" in lines["redelivery"]
    assert "all 7 checks passed" in out
    assert EMULATOR_APIKEY not in out


def test_check_wrong_key(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BELLA_QUEUE_APIKEY", "wrong-s3cr3t-key")

    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    captured = capsys.readouterr()
    lines = lines_of(captured.out)
    assert lines["bella-queue"].startswith("FAIL")
    assert "401: check BELLA_QUEUE_APIKEY" in lines["bella-queue"]
    assert lines[f"queue {env}"].startswith("skip")
    assert "wrong-s3cr3t-key" not in captured.out + captured.err


def test_check_unreachable_queue_url(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("BELLA_QUEUE_URL", dead)

    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    out = capsys.readouterr().out
    lines = lines_of(out)
    assert lines["bella-queue"].startswith("FAIL")
    assert "unreachable" in lines["bella-queue"]
    assert dead in lines["bella-queue"]
    assert lines["event bus"].startswith("skip")
    assert "failed" in out.splitlines()[-1]


def test_check_unregistered_queue(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    lines = lines_of(capsys.readouterr().out)
    assert lines["bella-queue"].startswith("ok")
    assert lines[f"queue {env}"].startswith("FAIL")
    assert "not registered" in lines[f"queue {env}"]
    assert "ray-worker register" in lines[f"queue {env}"]
    assert lines["event bus"].startswith("ok")


def test_check_unreachable_redis_hides_password(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["register", "--config", str(CONFIG)]) == 0
    monkeypatch.setenv("BELLA_EVENTBUS_URL", f"redis://:hunter2pw@127.0.0.1:{free_port()}/0")
    capsys.readouterr()

    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    captured = capsys.readouterr()
    lines = lines_of(captured.out)
    assert lines[f"queue {env}"].startswith("ok")
    assert lines["event bus"].startswith("FAIL")
    assert "BELLA_EVENTBUS_URL" in lines["event bus"]
    assert "***" in lines["event bus"]
    assert "hunter2pw" not in captured.out + captured.err


def test_check_eventbus_override_reachable(
    env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    redis_server: RedisServer,
) -> None:
    assert run_cli(["register", "--config", str(CONFIG)]) == 0
    monkeypatch.setenv("BELLA_EVENTBUS_URL", redis_server.url)
    capsys.readouterr()

    assert run_cli(["check", "--config", str(CONFIG)]) == 0

    assert "(BELLA_EVENTBUS_URL)" in lines_of(capsys.readouterr().out)["event bus"]


def test_check_missing_key_and_bad_config(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("BELLA_QUEUE_APIKEY")
    assert run_cli(["check", "--config", str(CONFIG)]) == 1
    lines = lines_of(capsys.readouterr().out)
    assert lines["api key"].startswith("FAIL")
    assert "BELLA_QUEUE_APIKEY" in lines["api key"]

    monkeypatch.setenv("BELLA_QUEUE_APIKEY", EMULATOR_APIKEY)
    missing = tmp_path / "nope.yaml"
    assert run_cli(["check", "--config", str(missing)]) == 1
    assert lines_of(capsys.readouterr().out)["config"].startswith("FAIL")


# ---------------------------------------------------------------- redelivery, plaintext URLs

NO_CONFIG_USER = ("no-config", "no-config-s3cr3t")
"""An ACL user of ``bare_redis`` that may do anything but CONFIG (as on many managed Redis)."""


@pytest.fixture(scope="module")
def bare_redis() -> Iterator[RedisServer]:
    """A Redis without keyspace notifications (redis-server's default, and the bundled
    docker-compose's), with the ACL user ``NO_CONFIG_USER``."""
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("notify-keyspace-events", "")
        user, password = NO_CONFIG_USER
        client.acl_setuser(
            user,
            enabled=True,
            passwords=[f"+{password}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all", "-config"],
        )
        client.close()
        yield server


@pytest.fixture(scope="module")
def bare_emulator(bare_redis: RedisServer) -> Iterator[EmulatorServer]:
    """An emulator whose Redis (the one GET /v1/queue/eventbus reports) is ``bare_redis``."""
    with emulator_server(bare_redis.url, "test") as server:
        yield server


@pytest.mark.parametrize(
    ("flags", "redelivers"),
    [
        ("Ex", True),
        ("xE", True),
        ("AE", True),
        ("KEA", True),
        ("", False),
        ("Kx", False),
        ("Eg", False),
        ("KEg$lshzetd", False),
    ],
)
def test_keyspace_flags_that_fire_the_redelivery_timer(flags: str, redelivers: bool) -> None:
    # Bella-Queue PSUBSCRIBEs __keyevent@0__:expired: keyevent (E) of expired keys (x; A has it).
    assert keyspace_events_redeliver(flags) is redelivers


def test_check_fails_when_bella_queues_redis_has_no_keyspace_events(
    env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    bare_emulator: EmulatorServer,
) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", bare_emulator.url)
    assert run_cli(["register", "--config", str(CONFIG)]) == 0
    capsys.readouterr()

    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    out = capsys.readouterr().out
    lines = lines_of(out)
    assert lines["event bus"].startswith("ok")
    line = lines["redelivery"]
    assert line.startswith("FAIL"), out
    assert "the Redis that holds the queues" in line
    assert "notify-keyspace-events ''" in line
    assert "never redelivered" in line
    assert "CONFIG SET notify-keyspace-events Ex" in line
    assert "1 of 7 checks failed" in out


def test_check_warns_when_an_override_redis_has_no_keyspace_events(
    env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    bare_redis: RedisServer,
) -> None:
    # BELLA_EVENTBUS_URL may name another Redis than Bella-Queue's: a warning, not a failure.
    assert run_cli(["register", "--config", str(CONFIG)]) == 0
    monkeypatch.setenv("BELLA_EVENTBUS_URL", bare_redis.url)
    capsys.readouterr()

    assert run_cli(["check", "--config", str(CONFIG)]) == 0

    out = capsys.readouterr().out
    line = lines_of(out)["redelivery"]
    assert line.startswith("WARN"), out
    assert "(BELLA_EVENTBUS_URL)" in line
    assert "if it is the Redis that holds Bella-Queue's queues" in line
    assert "all 7 checks passed, 1 with a warning" in out


def test_check_redelivery_unknown_when_redis_refuses_config(
    env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    bare_redis: RedisServer,
) -> None:
    assert run_cli(["register", "--config", str(CONFIG)]) == 0
    user, password = NO_CONFIG_USER
    monkeypatch.setenv(
        "BELLA_EVENTBUS_URL", f"redis://{user}:{password}@127.0.0.1:{bare_redis.port}/0"
    )
    capsys.readouterr()

    assert run_cli(["check", "--config", str(CONFIG)]) == 0

    captured = capsys.readouterr()
    lines = lines_of(captured.out)
    assert lines["event bus"].startswith("ok")
    line = lines["redelivery"]
    assert line.startswith("WARN"), captured.out
    assert "unknown whether it works" in line
    assert "CONFIG GET notify-keyspace-events failed" in line
    assert password not in captured.out + captured.err


def test_check_redelivery_needs_a_process_timeout_for_level_1_queues(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    document = yaml.safe_load(CONFIG.read_text())
    document["applications"][0]["args"]["poller"]["process_timeout_s"] = 0
    config = tmp_path / "no-redelivery.yaml"
    config.write_text(yaml.safe_dump(document))

    assert run_cli(["check", "--config", str(config)]) == 1
    line = lines_of(capsys.readouterr().out)["redelivery"]
    assert line.startswith("FAIL")
    assert "process_timeout_s is 0" in line
    assert f"{env}:1" in line
    assert "answered 503" in line

    monkeypatch.setenv("BELLA_QUEUE_QUEUES", f"{env}:0")  # online only: nothing to redeliver
    run_cli(["check", "--config", str(config)])
    line = lines_of(capsys.readouterr().out)["redelivery"]
    assert line.startswith("ok")
    assert "no level-1 queue" in line


def test_check_warns_of_a_plaintext_url_to_another_host(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # 0.0.0.0 is not a loopback address, and a connection to a free port there is refused at once.
    monkeypatch.setenv("BELLA_EVENTBUS_URL", f"redis://:hunter2pw@0.0.0.0:{free_port()}/0")

    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    captured = capsys.readouterr()
    lines = lines_of(captured.out)
    assert lines["event bus"].startswith("FAIL")
    assert lines["redelivery"].startswith("skip")
    line = lines["plaintext"]
    assert line.startswith("WARN")
    assert "event-bus Redis URL redis://:***@0.0.0.0:" in line
    assert "rediss://" in line
    assert "hunter2pw" not in captured.out + captured.err


# ------------------------------------------------------------------------------- register


def test_register_then_again(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["register", "--config", str(CONFIG)]) == 0
    first = lines_of(capsys.readouterr().out)[f"queue {env}"]
    assert first.startswith("ok")
    assert "registered, endpoint /v1/chat/completions" in first

    args = ["register", "--config", str(CONFIG), "--endpoint", "/v1/embeddings"]
    assert run_cli(args) == 0
    again = lines_of(capsys.readouterr().out)[f"queue {env}"]
    assert again.startswith("ok")
    assert "already registered, endpoint /v1/chat/completions" in again
    assert "not /v1/embeddings" in again


def test_register_bad_key_fails(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BELLA_QUEUE_APIKEY", "nope-key")
    assert run_cli(["register", "--config", str(CONFIG)]) == 1
    line = lines_of(capsys.readouterr().out)[f"queue {env}"]
    assert line.startswith("FAIL")
    assert "401: check BELLA_QUEUE_APIKEY" in line


# --------------------------------------------------------------------------------- status


class _StatusHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/bella":
            body = json.dumps(SAMPLE_STATUS).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
        else:
            body = b"not found"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[str]:
    """A stub of the worker's status endpoint; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StatusHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_format_status_summary() -> None:
    text = format_status(SAMPLE_STATUS)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[0].split() == [
        "worker",
        "running",
        "strategy",
        "active_passive",
        "in",
        "flight",
        "4",
    ]
    assert "pool tiny-llama (demo:0, demo:1)" in lines
    assert "state        failing" in lines
    assert "replicas     2" in lines
    assert "in flight    3 online, 1 offline" in lines
    assert "remaining    16 online, 14 offline" in lines
    assert "target       20" in lines
    assert "last take    0.012 s ago (asked 16, got 0)" in lines
    assert "backoff      0.4 s" in lines
    assert "last error   QueueUnavailableError: HTTP 502 from POST /v1/queue/take" in lines
    assert any(line.startswith("answered   2xx 25, 4xx 1, 5xx 0") for line in lines)


def test_format_status_tolerates_a_starting_worker() -> None:
    text = format_status(
        {"state": "waiting for Bella-Queue", "startup_error": "GET /v1/queue/eventbus failed"}
    )
    assert "waiting for Bella-Queue" in text
    assert "start-up   GET /v1/queue/eventbus failed" in text
    assert "no pools yet" in text

    never = {**SAMPLE_STATUS["pools"][0], "last_take_age_s": None, "capacity": {}}
    text = format_status({"state": "running", "pools": [never]})
    assert "last take    never" in text
    assert "replicas     -" in text


def test_status_over_http(status_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["status", "--url", f"{status_server}/bella"]) == 0
    assert capsys.readouterr().out.strip() == format_status(SAMPLE_STATUS)

    assert run_cli(["status", "--url", f"{status_server}/bella", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == SAMPLE_STATUS


def test_status_errors(status_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["status", "--url", f"{status_server}/other"]) == 1
    assert "HTTP 404" in capsys.readouterr().err

    assert run_cli(["status", "--url", f"http://127.0.0.1:{free_port()}/bella"]) == 1
    assert "cannot reach" in capsys.readouterr().err


# ------------------------------------------------------------------------- plumbing, help


def test_delegates_hand_over_their_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["emulator", "--help"])
    assert exit_info.value.code == 0
    assert "--redis-url" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["tiny-model", "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "check" in capsys.readouterr().out


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "ray-worker"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ray_worker.cli"]
    proc = subprocess.run(
        [*command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("check", "register", "status", "emulator", "demo", "tiny-model"):
        assert name in proc.stdout


def test_check_malformed_eventbus_url(
    env: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BELLA_EVENTBUS_URL", "http://127.0.0.1:6379/0")

    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    line = lines_of(capsys.readouterr().out)["event bus"]
    assert line.startswith("FAIL")
    assert "invalid event-bus URL" in line


def test_check_url_that_is_not_bella_queue(
    env: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    status_server: str,
) -> None:
    monkeypatch.setenv("BELLA_QUEUE_URL", status_server)  # answers 404 to /v1/queue/eventbus

    assert run_cli(["check", "--config", str(CONFIG)]) == 1

    line = lines_of(capsys.readouterr().out)["bella-queue"]
    assert line.startswith("FAIL")
    assert "HTTP 404" in line
    assert "BELLA_QUEUE_URL" in line


# -- ray-worker serve's supervision of serve run (real processes, a stand-in for serve run) ---

SERVE_STANDIN = r"""
import sys, time
out = sys.argv[1]
with open(out, "a") as f:
    f.write("started\n")
try:
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    with open(out, "a") as f:
        f.write("interrupted\n")
"""
SUPERVISOR = (
    "import sys; from ray_worker.supervise import supervise; sys.exit(supervise(sys.argv[1:]))"
)


def _supervised(out: Path, **popen: Any) -> tuple[subprocess.Popen[bytes], int]:
    """``supervise`` running the stand-in, once the stand-in started; and the stand-in's pid."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, sys.executable, "-c", SERVE_STANDIN, str(out)],
        start_new_session=True,
        **popen,
    )
    wait_for_sync(lambda: out.exists() and "started" in out.read_text(), 30)
    found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
    children = [int(p) for p in found.stdout.split()]
    assert len(children) == 1, children
    return proc, children[0]


@contextlib.contextmanager
def _reaped(proc: subprocess.Popen[bytes], child: int) -> Iterator[None]:
    """Whatever the test did, neither the supervisor nor the stand-in outlives it."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_sigterm_reaches_serve_run_as_sigint_even_when_started_with_sigint_ignored(
    tmp_path: Path,
) -> None:
    out = tmp_path / "standin.log"

    def ignore_sigint() -> None:  # how `nohup ray-worker serve ... &` in a script starts it
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc, child = _supervised(out, preexec_fn=ignore_sigint)
    with _reaped(proc, child):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert out.read_text().splitlines() == ["started", "interrupted"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_a_killed_supervisor_takes_serve_run_down(tmp_path: Path) -> None:
    out = tmp_path / "standin.log"
    proc, child = _supervised(out)
    with _reaped(proc, child):
        proc.kill()
        proc.wait()
        wait_for_sync(lambda: not _alive(child), 30)
        assert out.read_text().splitlines() == ["started"]  # SIGTERM: no drain, but gone


async def test_the_worker_itself_reads_whether_redelivery_can_fire(
    redis_server: RedisServer, bare_redis: RedisServer
) -> None:
    # What the poller and each replica ask at their start and stop (ray_worker.serve.redelivery).
    from ray_worker.serve.redelivery import redelivery_missing

    assert await redelivery_missing(redis_server.url) is None  # Ex: the timer fires
    why = await redelivery_missing(bare_redis.url)
    assert why is not None
    assert "notify-keyspace-events ''" in why
    assert "answered 503" in why
    # CONFIG refused (managed Redis): unknown, the configured behaviour stays.
    user, password = NO_CONFIG_USER
    assert (
        await redelivery_missing(f"redis://{user}:{password}@127.0.0.1:{bare_redis.port}/0") is None
    )
    assert await redelivery_missing(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1) is None
