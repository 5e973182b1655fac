"""The controller's systemd units: valid for systemd, hardened like the agent's."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
AGENT = DEPLOY / "edgefleet-agent.service"
UNITS = [DEPLOY / "edgefleet-serve.service", DEPLOY / "edgefleet-enroll.service"]

# The agent's sandbox, all of which applies to the controller's services too.
HARDENING = [
    "DynamicUser",
    "StateDirectoryMode",
    "UMask",
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectControlGroups",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "LockPersonality",
    "ProtectClock",
    "ProtectHostname",
    "ProtectKernelLogs",
    "ProtectProc",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "CapabilityBoundingSet",
    "AmbientCapabilities",
    "SystemCallArchitectures",
    "SystemCallFilter",
]


def directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of the [Service] section, every value of repeated keys."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(unit: Path, tmp_path: Path) -> list[str]:
    """``systemd-analyze verify`` on a copy whose ExecStart runs /bin/true (the
    venv at /opt/edgefleet is not on this machine): only the unit's own
    directives are judged. Returns the complaints."""
    copy = tmp_path / unit.name
    text = unit.read_text()
    copy.write_text(re.sub(r"(?m)^ExecStart=\S+", "ExecStart=/bin/true", text))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    complaints = [line for line in lines if copy.name in line or "rror" in line]
    if result.returncode != 0 and not complaints:
        complaints = lines or [f"exit status {result.returncode}"]
    return complaints


needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)


@needs_systemd
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    assert verify(unit, tmp_path) == []


@needs_systemd
def test_verify_catches_a_bad_directive(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    bad = tmp_path / "src" / "edgefleet-bad.service"
    bad.parent.mkdir()
    broken = "ProtectSystem=bogus\nProtectSytem=yes"
    bad.write_text(UNITS[0].read_text().replace("ProtectSystem=strict", broken))
    complaints = verify(bad, tmp_path)
    assert any("ProtectSytem" in c for c in complaints), complaints
    assert any("protect system" in c.lower() for c in complaints), complaints


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_is_hardened_like_the_agent(unit: Path) -> None:
    agent = directives(AGENT)
    mine = directives(unit)
    for key in HARDENING:
        assert key in agent, f"the agent unit no longer sets {key}: update this list"
        assert mine.get(key) == agent[key], f"{unit.name}: {key}={mine.get(key)} != agent's"
    # Both controller services share the home through the same dynamic user.
    assert mine["User"] == ["edgefleet"]
    assert mine["StateDirectory"] == ["edgefleet"]
    assert mine["Environment"].count("EDGEFLEET_HOME=/var/lib/edgefleet") == 1
    assert mine["ExecStart"][0].startswith("/opt/edgefleet/bin/edgefleet --config ")


def test_units_run_the_right_commands() -> None:
    serve, enroll = (directives(u)["ExecStart"][0].split() for u in UNITS)
    assert serve[-1] == "serve"
    assert "enroll-server" in enroll
    assert "--hostname" in enroll and "--broker-host" in enroll
    assert "EDGEFLEET_ENROLL_LISTEN=0.0.0.0:8443" in directives(UNITS[1])["Environment"]
