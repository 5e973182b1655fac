"""Operator fixes (issue 10, item 5): homes, JSON errors, broken pipes, exit statuses.

Each test runs the real command line (click's CliRunner in-process, or the
installed console script in a subprocess) on a real home and registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefleet.controller.cli import cli
from edgefleet.controller.registry import Registry, sqlite_url
from edgefleet.controller.rollout.runner import sign_reissue
from edgefleet.controller.rollout.store import RolloutStore, Selector
from edgefleet.controller.trust import TrustRepository
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
        "message": "give --device ID (repeatable) or --all",
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
        for i in range(3000):  # more than a pipe buffer of table
            registry.enroll_device(f"gw-{i:04d}", tags=("a-long-tag-to-fill-the-pipe",))
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
