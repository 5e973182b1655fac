"""Operator fixes (issue 10, item 5): homes, JSON errors, broken pipes, exit statuses.

Each test runs the real command line (click's CliRunner in-process, or the
installed console script in a subprocess) on a real home and registry.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefleet.agent.config import load_agent_config
from edgefleet.controller.broker import free_port
from edgefleet.controller.catalog import register_model
from edgefleet.controller.cli import cli
from edgefleet.controller.demo_model import build_demo_model
from edgefleet.controller.registry import Registry, sqlite_url
from edgefleet.controller.rollout.runner import sign_reissue
from edgefleet.controller.rollout.store import RolloutStore, Selector
from edgefleet.controller.trust import TrustRepository
from edgefleet.protocols.messages import (
    AgentState,
    Event,
    EventKind,
    HardwareInfo,
    ModelRef,
    ReportedState,
)
from edgefleet.shared.link import BrokerSettings
from tests.controller.cli.runner import run, run_in_home
from tests.controller.rollout.test_store import CFG, Fleet

COMMANDS_NEEDING_A_HOME = [
    ("devices",),
    ("status",),
    ("model", "list"),
    ("device", "events", "gw-1"),
    ("keys", "show"),
    ("rollout", "list"),
    ("ca", "init"),
    ("device", "enroll", "gw-1", "--out", "enrolled"),
]


EDGEFLEET = [sys.executable, "-c", "from edgefleet.controller.cli import main; main()"]
"""The ``edgefleet`` console script, run as its own process."""


def _bare_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(extra)
    return env


@pytest.mark.parametrize("args", COMMANDS_NEEDING_A_HOME, ids=" ".join)
def test_only_init_creates_a_home(tmp_path: Path, args: tuple[str, ...]) -> None:
    home = tmp_path / "nowhere"
    result = CliRunner(env=_bare_env()).invoke(
        cli, ["--home", str(home), *args], catch_exceptions=False
    )
    assert result.exit_code == 1, result.output
    assert f"no controller home at {home}" in result.output
    assert "from --home" in result.output and "edgefleet init" in result.output
    assert "[home_missing]" in result.output
    assert not home.exists()  # nothing created: no fresh keys, no empty registry

    assert run_in_home(home, "init").exit_code == 0
    assert (home / "repository" / "metadata").is_dir() and (home / "registry.db").is_file()


def test_missing_home_names_how_it_was_chosen(tmp_path: Path, bare_config: Path) -> None:
    by_env = CliRunner(env=_bare_env(EDGEFLEET_HOME=str(tmp_path / "env-home"))).invoke(
        cli, ["devices"], catch_exceptions=False
    )
    assert by_env.exit_code == 1 and "from EDGEFLEET_HOME" in by_env.output
    assert f"{tmp_path / 'env-home'}" in by_env.output

    by_config = run(bare_config, "status")
    assert by_config.exit_code == 1
    assert f"no controller home at {tmp_path / 'state'}" in by_config.output
    assert f"from `home` in {bare_config}" in by_config.output

    # The default, ./edgefleet-data, in the working directory.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(
        [*EDGEFLEET, "devices"],
        check=False,
        cwd=cwd,
        env=_bare_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert f"no controller home at {cwd / 'edgefleet-data'}" in proc.stderr
    assert "the default" in proc.stderr and "Traceback" not in proc.stderr
    assert not (cwd / "edgefleet-data").exists()


def test_init_is_idempotent_and_keeps_the_keys(home: Path, tmp_path: Path) -> None:
    root = (tmp_path / "state" / "repository" / "metadata" / "1.root.json").read_bytes()
    again = run(home, "init", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["home"] == str(tmp_path / "state")
    assert (tmp_path / "state" / "repository" / "metadata" / "1.root.json").read_bytes() == root


def test_json_errors_are_json_on_stderr(tmp_path: Path, home: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        cli, ["--home", str(tmp_path / "none"), "devices", "--json"], catch_exceptions=False
    )
    assert missing.exit_code == 1 and missing.stdout == ""
    error = json.loads(missing.stderr)["error"]
    assert error["code"] == "home_missing" and error["exit_status"] == 1
    assert str(tmp_path / "none") in error["message"] and "[home_missing]" not in error["message"]

    unknown = runner.invoke(
        cli, ["--config", str(home), "device", "events", "nope", "--json"], catch_exceptions=False
    )
    assert unknown.exit_code == 1 and unknown.stdout == ""
    assert json.loads(unknown.stderr)["error"]["message"] == "no device 'nope' is enrolled"

    usage = runner.invoke(cli, ["--config", str(home), "deploy", "m", "1", "--json"])
    assert usage.exit_code == 2 and usage.stdout == ""
    assert json.loads(usage.stderr)["error"] == {
        "code": "usage",
        "message": "give --device ID and/or --tag TAG (repeatable), or --all",
        "exit_status": 2,
    }
    # Without --json the same failure stays a sentence.
    plain = runner.invoke(cli, ["--config", str(home), "device", "events", "nope"])
    assert plain.exit_code == 1 and plain.stderr.startswith("Error: no device 'nope'")


def test_a_closed_pipe_ends_quietly_with_status_0(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_in_home(home, "init").exit_code == 0
    registry = Registry(sqlite_url(home / "registry.db"))
    try:
        tags = tuple(f"a-long-tag-to-fill-the-pipe-{n}" for n in range(10))
        for i in range(400):  # ~150 KB of table: more than a pipe buffer
            registry.enroll_device(f"gw-{i:04d}", tags=tags)
    finally:
        registry.close()
    for args in (["devices"], ["devices", "--json"]):
        proc = subprocess.Popen(
            [*EDGEFLEET, "--home", str(home), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_bare_env(),
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()  # `| head -1`: one line, then the reader goes away
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 0, err
        assert err == ""


def test_rollout_watch_exit_status_says_how_the_rollout_ended(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_in_home(home, "init").exit_code == 0
    registry = Registry(sqlite_url(home / "registry.db"))
    repo = TrustRepository.open(home / "repository")
    sign = lambda r: sign_reissue(repo, r)  # noqa: E731
    try:
        fleet = Fleet(registry, repo, 3)
        store = RolloutStore(registry, actor="test")
        # A canary that errors on 40% of its requests halts the rollout; it is rolled back.
        for device_id in fleet.ids:
            fleet.telemetry(device_id, "1.0", 50, 0, 3.0)
        halted = store.create("m", "2.0", Selector(tags=("t",)), CFG)
        store.step(halted.id, sign)
        desired = registry.desired_for("d00")
        assert desired is not None
        fleet.report("d00", fleet.ref("2.0"), deployment=halted.id, generation=desired.generation)
        store.step(halted.id, sign)
        fleet.telemetry("d00", "2.0", 10, 4, 3.0)
        store.step(halted.id, sign)
        back = fleet.desired("d00")
        assert back is not None
        fleet.report("d00", back)
        store.step(halted.id, sign)
        assert store.get(halted.id).status.value == "halted"
    finally:
        registry.close()

    watched = run_in_home(home, "rollout", "watch", halted.id, "--interval", "0.1")
    assert watched.exit_code == 1, watched.output
    assert f"rollout {halted.id} halted" in watched.stderr
    as_json = run_in_home(home, "rollout", "watch", halted.id, "--interval", "0.1", "--json")
    assert as_json.exit_code == 1
    assert json.loads(as_json.stderr)["error"]["code"] == "rollout_halted"
    assert json.loads(as_json.stdout.splitlines()[-1])["status"] == "halted"
    assert run_in_home(home, "rollout", "watch", halted.id, "--once").exit_code == 0

    registry = Registry(sqlite_url(home / "registry.db"))
    try:
        fleet.registry = registry
        store = RolloutStore(registry, actor="test")
        done = store.create("m", "2.0", Selector(devices=("d01", "d02")), CFG)
        for _ in range(8):
            store.step(done.id, sign)
            for d in store.devices(done.id):
                if d.state.value == "in_flight":
                    fleet.report(d.device_id, fleet.ref("2.0"))
                if d.state.value == "observing":
                    fleet.telemetry(d.device_id, "2.0", 5, 0, 1.0)
        assert store.get(done.id).status.value == "completed"
    finally:
        registry.close()
    completed = run_in_home(home, "rollout", "watch", done.id, "--interval", "0.1")
    assert completed.exit_code == 0, completed.output


# ----------------------------------------------------------------------------- ports


def test_serve_names_a_taken_broker_port_in_one_line(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(home, "serve", "--embedded-broker", "--broker-port", str(port))
        assert result.exit_code == 1
        assert result.output.strip() == (
            f"Error: cannot start the embedded MQTT broker on 127.0.0.1:{port}: port {port} "
            "is already in use (another broker?); choose another with --broker-port [broker]"
        )
        json_result = run(home, "serve", "--embedded-broker", "--broker-port", str(port), "--json")
        # serve has no --json; a usage error, not a traceback.
        assert json_result.exit_code == 2 and "Traceback" not in json_result.output


def test_serve_on_a_chosen_port_and_enroll_uses_it(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_in_home(home, "init").exit_code == 0
    port = free_port()
    serve = subprocess.Popen(
        [
            *EDGEFLEET,
            "--home",
            str(home),
            "--log-format",
            "json",
            "-v",
            "serve",
            "--embedded-broker",
            "--broker-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_bare_env(),
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert serve.poll() is None, serve.stderr.read().decode()  # type: ignore[union-attr]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "serve never listened on its --broker-port"
                time.sleep(0.2)
        # Without --config, an enrolled agent gets the address serve runs with, not 1883.
        out = tmp_path / "gw-1"
        result = run_in_home(
            home, "device", "enroll", "gw-1", "--out", str(out), "--agent-http-port", "18471"
        )
        assert result.exit_code == 0, result.output
        assert f"agent broker 127.0.0.1:{port} (where `edgefleet serve` ran)" in result.output
        config = load_agent_config(out / "agent.toml")
        assert (config.broker.host, config.broker.port) == ("127.0.0.1", port)
        assert config.http.port == 18471 and config.device_id == "gw-1"
    finally:
        serve.terminate()
        _, err = serve.communicate(timeout=30)
    # --log-format json: log records are JSON objects, one a line.
    records = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(
        r["logger"] == "edgefleet.controller.broker" and str(port) in r["message"] for r in records
    ), err.decode()
    assert all({"at", "level", "logger", "message"} <= r.keys() for r in records)


def test_enroll_takes_the_broker_from_the_config(home: Path, tmp_path: Path) -> None:
    broker_port = int(home.read_text().split("port = ")[1].split()[0])
    result = run(home, "device", "enroll", "gw-1", "--out", str(tmp_path / "a"), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["broker"] == f"127.0.0.1:{broker_port}" and data["agent_http_port"] == 8470
    assert data["broker_from"] == f"[broker] of {home}"
    assert load_agent_config(tmp_path / "a" / "agent.toml").broker.port == broker_port
    result = run(
        home, "device", "enroll", "gw-2", "--out", str(tmp_path / "b"),
        "--broker-host", "mqtt.test", "--broker-port", "8883", "--agent-http-port", "0",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = load_agent_config(tmp_path / "b" / "agent.toml")
    assert (config.broker.host, config.broker.port, config.http.port) == ("mqtt.test", 8883, 0)


# ---------------------------------------------------------------------- devices, tags


def test_devices_show_profile_running_variant_and_tags(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run_in_home(home, "init").exit_code == 0
    registry = Registry(sqlite_url(home / "registry.db"))
    try:
        repo = TrustRepository.open(home / "repository")
        reg = register_model(
            registry, repo, build_demo_model(), name="det", version="1.0",
            hardware_classes=("generic", "x86-vnni"),
        )  # fmt: skip
        vnni = next(b for b in reg.bundles if b.hardware_class == "x86-vnni")
        registry.enroll_device("gw-1", tags=("lab", "eu"))
        registry.enroll_device("gw-2")
        registry.record_reported(
            ReportedState(
                device_id="gw-1",
                state=AgentState.IDLE,
                active=ModelRef("det", "1.0", reg.version.release, vnni.target_path),
                hardware=HardwareInfo("x86_64", cpu_features=("avx512_vnni",)),
            ),
            profile="x86-vnni",
        )
    finally:
        registry.close()
    rows = {r["id"]: r for r in json.loads(run_in_home(home, "devices", "--json").output)}
    assert rows["gw-1"]["hardware_class"] == "generic"  # what the agent was told to call itself
    assert (rows["gw-1"]["profile"], rows["gw-1"]["variant"]) == ("x86-vnni", "x86-vnni")
    assert rows["gw-1"]["tags"] == ["lab", "eu"] and rows["gw-2"]["tags"] == []
    assert rows["gw-2"]["variant"] is None
    table = run_in_home(home, "devices").output.splitlines()
    assert table[0].split()[:4] == ["DEVICE", "ONLINE", "PROFILE", "VARIANT"]
    assert "TAGS" in table[0] and "CLASS" not in table[0]
    gw1 = table[1].split()
    assert gw1[:4] == ["gw-1", "no", "x86-vnni", "x86-vnni"] and "lab,eu" in gw1


def test_tags_are_editable_after_enrollment(home: Path, tmp_path: Path) -> None:
    assert run(home, "device", "enroll", "gw-1", "--tag", "a", "--tag", "b", "--out",
               str(tmp_path / "e")).exit_code == 0  # fmt: skip
    result = run(home, "device", "tag", "gw-1", "--add", "c", "--remove", "a", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"device_id": "gw-1", "tags": ["b", "c"]}
    # Idempotent: adding what is there and removing what is not changes nothing.
    again = run(home, "device", "tag", "gw-1", "--add", "c", "--remove", "zz")
    assert again.exit_code == 0 and again.output.strip() == "gw-1: b, c"
    devices = json.loads(run(home, "devices", "--json").output)
    assert devices[0]["tags"] == ["b", "c"]
    assert run(home, "device", "tag", "gw-1").output.strip() == "gw-1: b, c"

    unknown = run(home, "device", "tag", "nope", "--add", "x", "--json")
    assert unknown.exit_code == 1 and json.loads(unknown.stderr)["error"]["code"] == "not_found"
    for bad in (["--add", "has space"], ["--add", "a,b"], ["--add", "x", "--remove", "x"]):
        refused = run(home, "device", "tag", "gw-1", *bad)
        assert refused.exit_code == 1 and refused.output.startswith("Error: "), refused.output
    assert json.loads(run(home, "devices", "--json").output)[0]["tags"] == ["b", "c"]


# ----------------------------------------------------------------------------- events


def test_events_are_listed_in_the_devices_own_order(home: Path, tmp_path: Path) -> None:
    assert run(home, "device", "enroll", "gw-1", "--out", str(tmp_path / "e")).exit_code == 0
    registry = Registry(sqlite_url(tmp_path / "state" / "registry.db"))
    at = float(int(time.time()))  # one second for all of them
    kinds = {1: EventKind.DOWNLOAD_STARTED, 2: EventKind.VERIFIED, 3: EventKind.INSTALLED}

    def event(seq: int) -> Event:
        return Event("gw-1", kinds[seq], generation=1, at=at, journal="j1", seq=seq)

    try:
        # Arrival order 2, 3, then 1 replayed late; then the controller's own event.
        registry.add_events([event(2)])
        registry.add_events([event(3)])
        registry.add_events([event(1)])
        registry.add_controller_event("gw-1", "duplicate_device_id", {"reason": "journals"})
    finally:
        registry.close()
    listed = json.loads(run(home, "device", "events", "gw-1", "--json").output)
    assert [(e["kind"], e["seq"]) for e in listed] == [
        ("duplicate_device_id", None),
        ("installed", 3),
        ("verified", 2),
        ("download_started", 1),
    ]
    table = run(home, "device", "events", "gw-1").output.splitlines()
    assert table[0].split()[:3] == ["SEQ", "AT", "EVENT"]
    assert [line.split()[0] for line in table[1:5]] == ["-", "3", "2", "1"]
    assert "journals" in table[1]


# --------------------------------------------------------------------------- delivery


def test_devices_and_status_flag_desired_states_nobody_delivered(
    tmp_path: Path, embedded_broker: BrokerSettings
) -> None:
    """Issue 10's worst: a deploy to the wrong broker said "published" and nothing showed it."""
    dead = tmp_path / "dead.toml"  # a broker nobody listens on: the deploy cannot publish
    dead.write_text(f'home = "state"\n[broker]\nhost = "127.0.0.1"\nport = {free_port()}\n')
    assert run(dead, "init").exit_code == 0
    model = tmp_path / "m.onnx"
    model.write_bytes(build_demo_model())
    assert (
        run(dead, "model", "register", str(model), "--name", "m", "--version", "1").exit_code == 0
    )
    for device in ("gw-1", "gw-2"):
        assert run(dead, "device", "enroll", device, "--out", str(tmp_path / device)).exit_code == 0
    deployed = run(dead, "deploy", "m", "1", "--device", "gw-1")
    # Recorded, and said so: no "published" claim from a command that publishes nothing.
    assert deployed.exit_code == 0, deployed.output
    assert "1 desired state(s) recorded in the registry, none published" in deployed.output
    rows = {r["id"]: r for r in json.loads(run(dead, "devices", "--json").output)}
    assert rows["gw-1"]["delivery"] == "unpublished" and rows["gw-2"]["delivery"] is None
    status = run(dead, "status")
    assert "desired states unpublished: 1 (gw-1)" in status.output
    assert "`edgefleet serve` publishes desired states" in status.output
    assert json.loads(run(dead, "status", "--json").output)["delivery"] == {
        "unpublished": 1,
        "unacknowledged": 0,
    }
    # gw-2 too; then a controller marks both published (as `serve` does once it has sent them).
    assert run(dead, "deploy", "m", "1", "--device", "gw-2").exit_code == 0
    registry = Registry(sqlite_url(tmp_path / "state" / "registry.db"))
    try:
        for pending in registry.unpublished_desired():
            registry.mark_published(pending.device_id, pending.generation)
    finally:
        registry.close()
    live = tmp_path / "live.toml"
    live.write_text(
        f'home = "state"\n[broker]\nhost = "{embedded_broker.host}"\n'
        f"port = {embedded_broker.port}\n"
    )
    rows = {r["id"]: r for r in json.loads(run(live, "devices", "--json").output)}
    assert rows["gw-2"]["delivery"] == "waiting"
    rows = {
        r["id"]: r
        for r in json.loads(run(live, "devices", "--json", "--ack-timeout-s", "0").output)
    }
    assert rows["gw-2"]["delivery"] == "unacknowledged"
    status = run(live, "status", "--ack-timeout-s", "0").output
    assert "desired states unacknowledged: 2 (gw-1, gw-2)" in status

    # The device reports the generation: acknowledged.
    registry = Registry(sqlite_url(tmp_path / "state" / "registry.db"))
    try:
        desired = registry.desired_for("gw-2")
        assert desired is not None
        registry.record_reported(
            ReportedState(
                device_id="gw-2",
                state=AgentState.IDLE,
                active=None,
                hardware=HardwareInfo("x86_64"),
                generation=desired.generation,
            )
        )
    finally:
        registry.close()
    rows = {
        r["id"]: r
        for r in json.loads(run(live, "devices", "--json", "--ack-timeout-s", "0").output)
    }
    assert rows["gw-2"]["delivery"] == "acknowledged"


def test_tags_events_and_duplicates_on_every_database(tmp_path: Path, database_url: str) -> None:
    """The registry parts behind the commands, on SQLite and PostgreSQL."""
    home = tmp_path / "home"
    base = ["--home", str(home), "--database-url", database_url]
    cli_run = lambda *a: CliRunner().invoke(cli, [*base, *a], catch_exceptions=False)  # noqa: E731
    assert cli_run("init").exit_code == 0
    registry = Registry(database_url)
    try:
        registry.enroll_device("gw-1", tags=("a",))
        registry.add_events(
            [Event("gw-1", EventKind.VERIFIED, generation=1, journal="j", seq=s) for s in (2, 1)]
        )
        registry.add_controller_event("gw-1", "duplicate_device_id", {"reason": "journals"})
        assert not registry.add_controller_event("nope", "duplicate_device_id")
    finally:
        registry.close()
    tagged = cli_run("device", "tag", "gw-1", "--add", "b", "--remove", "a", "--json")
    assert json.loads(tagged.output)["tags"] == ["b"]
    listed = json.loads(cli_run("device", "events", "gw-1", "--json").output)
    assert [e["seq"] for e in listed] == [None, 2, 1]
    rows = json.loads(cli_run("devices", "--json").output)
    assert rows[0]["tags"] == ["b"] and rows[0]["duplicate_at"] is not None
    assert json.loads(cli_run("status", "--json").output)["duplicate_ids"] == 1
