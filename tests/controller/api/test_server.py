"""Serving the API: the [api] table, a port in use, TLS, clean shutdown, `serve --api-address`."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgefleet.controller.api.server import start_api
from edgefleet.controller.ca import CertificateAuthority
from edgefleet.controller.cli import cli
from edgefleet.controller.config import ApiSettings, load_controller_config
from edgefleet.protocols.errors import ConfigError
from tests.controller.api.conftest import ApiClient, ApiFixture


def test_api_table_is_read_and_checked(tmp_path: Path) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('[api]\naddress = "192.0.2.7:9000"\nenabled = false\n')
    api = load_controller_config(config).api
    assert (api.host, api.port, api.enabled, api.tls) == ("192.0.2.7", 9000, False, False)
    assert load_controller_config(None).api.address == "127.0.0.1:8480"
    for bad, why in (
        ('address = "nowhere"', "host:port"),
        ('address = "h:99999"', "0-65535"),
        ('address = "h:http"', "non-numeric"),
        ("address = 8480", "string"),
        ('cert_file = "c.pem"', "together"),
        ('enabled = "yes"', "true or false"),
        ("colour = 1", "unknown"),
    ):
        config.write_text(f"[api]\n{bad}\n")
        with pytest.raises(ConfigError, match=why):
            load_controller_config(config)


def test_a_port_in_use_is_one_clear_error(api: ApiFixture) -> None:
    busy = ApiSettings(address=f"127.0.0.1:{api.server.port}")
    with pytest.raises(ConfigError, match=f"127.0.0.1:{api.server.port} is already in use"):
        start_api(api.harness.service, busy)
    # The running server is unharmed.
    assert api.client.get("/api/v1/fleet", api.viewer).status == 200


def test_stop_frees_the_port(api: ApiFixture) -> None:
    port = api.server.port
    api.server.stop()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
    again = start_api(api.harness.service, ApiSettings(address=f"127.0.0.1:{port}"))
    try:
        assert ApiClient(again.url).get("/api/v1/fleet", api.viewer).status == 200
    finally:
        again.stop()


def test_tls(api: ApiFixture, tmp_path: Path) -> None:
    authority = CertificateAuthority.init(tmp_path / "tls-ca")
    issued = authority.issue_server_cert(["127.0.0.1"])
    cert, key = tmp_path / "api.pem", tmp_path / "api.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    settings = ApiSettings(address="127.0.0.1:0", cert_file=str(cert), key_file=str(key))
    server = start_api(api.harness.service, settings)
    try:
        assert server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(authority.ca_file))
        client = ApiClient(server.url)
        reply = client.call("GET", "/api/v1/fleet", api.viewer, context=trusted)
        assert reply.status == 200 and reply.body["devices"] == 0
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            client.call("GET", "/api/v1/fleet", api.viewer, context=ssl.create_default_context())
    finally:
        server.stop()
    missing = ApiSettings(
        address="127.0.0.1:0", cert_file=str(tmp_path / "nope.pem"), key_file=str(key)
    )
    with pytest.raises(ConfigError, match=r"nope\.pem"):
        start_api(api.harness.service, missing)


def test_serve_names_the_busy_api_address_and_cleans_up(tmp_path: Path) -> None:
    broker_port = _free_port()
    config = tmp_path / "controller.toml"
    config.write_text(
        f'home = "{tmp_path / "home"}"\n[broker]\nhost = "127.0.0.1"\nport = {broker_port}\n'
    )
    assert CliRunner().invoke(cli, ["--config", str(config), "init"]).exit_code == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli,
            [
                "--config",
                str(config),
                "serve",
                "--embedded-broker",
                "--api-address",
                f"127.0.0.1:{port}",
            ],
        )
    assert result.exit_code == 1, result.output
    assert f"127.0.0.1:{port} is already in use" in result.output
    assert "Traceback" not in result.output
    # The embedded broker it had started is stopped again.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", broker_port))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.slow
def test_serve_runs_the_api_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    config = tmp_path / "controller.toml"
    config.write_text(
        f'home = "{home}"\n[broker]\nhost = "127.0.0.1"\nport = {_free_port()}\n'
        f'[api]\naddress = "127.0.0.1:{_free_port()}"\n'
    )
    assert CliRunner().invoke(cli, ["--config", str(config), "init"]).exit_code == 0
    made = CliRunner().invoke(
        cli, ["--config", str(config), "token", "create", "--role", "viewer", "--name", "t"]
    )
    assert made.exit_code == 0, made.output
    token = made.output.split()[0]
    api_port = load_controller_config(config).api.port
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from edgefleet.controller.cli import main; main()",
            "--config",
            str(config),
            "serve",
            "--embedded-broker",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        client = ApiClient(f"http://127.0.0.1:{api_port}")
        deadline = time.monotonic() + 90
        reply = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                reply = client.get("/api/v1/fleet", token)
                break
            except OSError:
                time.sleep(0.2)
        assert reply is not None and reply.status == 200, proc.poll()
        assert client.get("/api/v1/fleet").status == 401
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = output.decode()
    assert proc.returncode == 0, text
    assert f"API on http://127.0.0.1:{api_port}" in text and "Traceback" not in text
    with socket.socket() as probe:  # the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", api_port))
