"""``edgefleet model profiles``: built-in and configured device profiles, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgefleet.controller.cli import cli
from edgefleet.controller.compiler import BUILTIN_PROFILES

PROFILES = """
[profiles.shelf-cam]
arch = "arm64"
cpu_features = ["asimd", "asimddp"]
precisions = ["fp32", "int8"]
max_bundle_bytes = 5_000_000

[profiles.arm64-basic]
arch = "arm64"
cpu_features = ["asimd"]
precisions = ["fp32"]
"""


def test_lists_builtin_profiles_as_json_and_table(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--home", str(tmp_path), "model", "profiles", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == list(BUILTIN_PROFILES)
    vnni = next(r for r in rows if r["name"] == "x86-vnni")
    assert vnni == {**BUILTIN_PROFILES["x86-vnni"].to_dict(), "source": "built-in"}
    table = runner.invoke(cli, ["--home", str(tmp_path), "model", "profiles"])
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "SOURCE", "RUNTIME"]
    assert any(line.split()[:2] == ["arm64-litert", "built-in"] for line in lines)


def test_configured_profiles_are_listed_and_replacements_said(tmp_path: Path) -> None:
    (tmp_path / "profiles.toml").write_text(PROFILES)
    config = tmp_path / "controller.toml"
    config.write_text('profiles = "profiles.toml"\n')
    runner = CliRunner()
    result = runner.invoke(
        cli, ["--config", str(config), "--home", str(tmp_path), "model", "profiles", "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["shelf-cam"]["source"] == str(tmp_path / "profiles.toml")
    assert rows["shelf-cam"]["max_bundle_bytes"] == 5_000_000
    assert rows["arm64-basic"]["precisions"] == ["fp32"]
    assert rows["arm64-basic"]["replaces"] == "built-in"
    assert rows["x86-vnni"]["source"] == "built-in"
    # --profiles adds a file on top, as `model compile --profiles` does.
    extra = tmp_path / "extra.toml"
    extra.write_text(
        '[profiles.kiosk]\narch = "x86_64"\ncpu_features = ["avx2"]\nprecisions = ["fp32"]\n'
    )
    table = runner.invoke(
        cli,
        [
            "--config",
            str(config),
            "--home",
            str(tmp_path),
            "model",
            "profiles",
            "--profiles",
            str(extra),
        ],
    )
    assert table.exit_code == 0, table.output
    assert "kiosk" in table.stdout
    assert "(replaces built-in)" in table.stdout


def test_a_bad_profiles_file_is_a_one_line_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[profiles.x]\narch = 'mips'\n")
    result = CliRunner().invoke(
        cli, ["--home", str(tmp_path), "model", "profiles", "--profiles", str(bad)]
    )
    assert result.exit_code == 1
    assert "arch must be one of" in result.output
    assert "Traceback" not in result.output
