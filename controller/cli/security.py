"""The "secure by default" commands: CA, broker config, enrollment tokens, revocation.

The root group (``controller/cli/__init__.py``) registers them; ``token`` and
``revoke`` go under ``edgefleet device``::

    edgefleet ca init                     # the CA in <home>/ca (key 0600)
    edgefleet ca crl [--crl-out PATH]     # re-sign the CRL before it expires
    edgefleet broker-config --hostname mqtt.example.net --out DIR
                                          # mosquitto.conf, ACL, broker + controller certs
    edgefleet enroll-server --hostname controller.example.net --broker-host mqtt.example.net
                                          # the HTTPS enrollment endpoint
    edgefleet device token gw-1 --url https://controller.example.net:8443 --out DIR
                                          # one-time token file + agent.toml for the device
    edgefleet device revoke gw-1 [--crl-out /etc/mosquitto/certs/crl.pem]

The CA (and with it the cryptography package) is loaded when a command runs,
not when the command line is built.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import emit, friendly_errors, json_option
from edgefleet.controller.errors import DuplicateError

if TYPE_CHECKING:
    from edgefleet.controller.ca import CertificateAuthority

__all__ = ["broker_config", "ca", "device_revoke", "device_token", "enroll_server"]


def _ca_dir(ctx: Context) -> Path:
    # The CA lives in the home, which only `edgefleet init` creates.
    return ctx.require_home() / "ca"


def _open_ca(ctx: Context) -> CertificateAuthority:
    from edgefleet.controller.ca import CertificateAuthority

    return CertificateAuthority.open(_ca_dir(ctx))


def _copy_crl(ca_: CertificateAuthority, crl_out: Path | None) -> None:
    from edgefleet.controller.ca import write_public_file

    if crl_out is not None:
        write_public_file(crl_out, ca_.crl_file.read_bytes())


# --------------------------------------------------------------------------- ca
@click.group()
def ca() -> None:
    """The certificate authority that issues broker, controller and device certificates."""


@ca.command("init")
@json_option
@pass_ctx
def ca_init(ctx: Context, as_json: bool) -> None:
    """Create the CA in <home>/ca (private key readable by its owner only)."""
    from edgefleet.controller.ca import CertificateAuthority

    with friendly_errors():
        authority = CertificateAuthority.init(_ca_dir(ctx))
    data = {"ca_dir": str(authority.directory), "ca_file": str(authority.ca_file)}
    emit(as_json, data, lambda: f"CA created in {authority.directory}; trust {authority.ca_file}")


@ca.command("crl")
@click.option(
    "--crl-out", type=click.Path(dir_okay=False, path_type=Path), help="Also copy the CRL here."
)
@json_option
@pass_ctx
def ca_crl(ctx: Context, crl_out: Path | None, as_json: bool) -> None:
    """Re-sign the CRL (it is valid for 30 days; an expired CRL locks every client out)."""
    with friendly_errors():
        authority = _open_ca(ctx)
        path = authority.write_crl()
        _copy_crl(authority, crl_out)
    data = {"crl": str(path), "copied_to": None if crl_out is None else str(crl_out)}
    copied = f"; copied to {crl_out}" if crl_out else ""
    emit(as_json, data, lambda: f"CRL re-signed: {path}{copied}")


# --------------------------------------------------------------------------- broker config
@click.command("broker-config")
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    required=True,
    help="Name or IP clients use to reach the broker (repeatable); goes into its certificate.",
)
@click.option("--port", default=8883, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--cert-dir",
    default="/etc/mosquitto/certs",
    show_default=True,
    help="Where the broker will find the certificate files (written into mosquitto.conf).",
)
@click.option(
    "--acl-file",
    default="/etc/mosquitto/edgefleet.acl",
    show_default=True,
    help="Where the broker will find the ACL (written into mosquitto.conf).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write mosquitto.conf, edgefleet.acl, certs/ and controller/ into.",
)
@json_option
@pass_ctx
def broker_config(
    ctx: Context,
    hostnames: tuple[str, ...],
    port: int,
    cert_dir: str,
    acl_file: str,
    out_dir: Path,
    as_json: bool,
) -> None:
    """Write a Mosquitto TLS configuration, its ACL and certificates, and the controller's.

    certs/ goes to --cert-dir on the broker host (broker.key owned by the
    mosquitto user, mode 0600); controller/ holds `serve`'s client
    certificate for its config's [broker] table. No certificate is made for
    the CLI: it never connects to the broker (it deploys through `serve`'s
    API, or writes the registry that `serve` publishes from), so no
    credential but the controller's may publish desired states.
    """
    from edgefleet.controller.ca import (
        CONTROLLER_COMMON_NAME,
        write_private_file,
        write_public_file,
    )
    from edgefleet.controller.mosquitto_config import (
        MosquittoPaths,
        render_acl,
        render_mosquitto_conf,
    )

    with friendly_errors():
        authority = _open_ca(ctx)
        server = authority.issue_server_cert(hostnames)
        client = authority.issue_client_cert(CONTROLLER_COMMON_NAME)
        certs = out_dir / "certs"
        write_public_file(certs / "ca.pem", authority.cert_pem)
        write_public_file(certs / "broker.pem", server.cert_pem)
        write_private_file(certs / "broker.key", server.key_pem)
        write_public_file(certs / "crl.pem", authority.write_crl().read_bytes())
        controller = out_dir / "controller"
        write_public_file(controller / "ca.pem", authority.cert_pem)
        write_public_file(controller / "controller.pem", client.cert_pem)
        write_private_file(controller / "controller.key", client.key_pem)
        paths = MosquittoPaths(cert_dir=cert_dir, acl_file=acl_file, port=port)
        write_public_file(out_dir / "mosquitto.conf", render_mosquitto_conf(paths).encode())
        write_public_file(out_dir / "edgefleet.acl", render_acl().encode())
    data = {
        "mosquitto_conf": str(out_dir / "mosquitto.conf"),
        "acl": str(out_dir / "edgefleet.acl"),
        "certs": str(certs),
        "controller": str(controller),
        "hostnames": list(hostnames),
        "port": port,
    }
    emit(
        as_json,
        data,
        lambda: (
            f"wrote {out_dir}/mosquitto.conf, edgefleet.acl and certs/ (install into {cert_dir}),\n"
            f"and {controller}/ (the controller's [broker] ca_file, cert_file, key_file)"
        ),
    )


# --------------------------------------------------------------------------- enrollment
@click.command("enroll-server")
@click.option(
    "--listen",
    default="127.0.0.1:8443",
    show_default=True,
    envvar="EDGEFLEET_ENROLL_LISTEN",
    help="HOST:PORT to bind. Loopback by default: give the address devices reach "
    "(e.g. 0.0.0.0:8443) to expose it; an empty HOST (':8443') means all interfaces.",
)
@click.option(
    "--hostname",
    "hostnames",
    multiple=True,
    required=True,
    help="Name or IP devices use to reach this endpoint (repeatable).",
)
@click.option("--broker-host", required=True, help="Broker host name devices should dial.")
@click.option("--broker-port", default=8883, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--max-connections",
    default=64,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Connections handshaken or served at once; more are closed and counted.",
)
@click.option(
    "--per-source-connections",
    default=8,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="The same, per source IP (raise it if many devices enroll from behind one NAT).",
)
@click.option(
    "--per-source-rate",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.01, 10_000),
    help="Connections per second one source IP may open, sustained (burst of 20).",
)
@click.option(
    "--handshake-timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 600),
    help="Time for the TLS handshake, and for each read or write of a request.",
)
@pass_ctx
def enroll_server(
    ctx: Context,
    listen: str,
    hostnames: tuple[str, ...],
    broker_host: str,
    broker_port: int,
    max_connections: int,
    per_source_connections: int,
    per_source_rate: float,
    handshake_timeout_s: float,
) -> None:
    """Run the HTTPS enrollment endpoint until Ctrl-C.

    Refused connections and requests are logged and counted per reason in
    the registry (``rejected.enrollment_<reason>``, shown by ``edgefleet status``).
    """
    from edgefleet.controller.enrollment import (
        DeviceBroker,
        EnrollmentLimits,
        EnrollmentServer,
        TokenStore,
    )

    host, _, port_text = listen.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise click.BadParameter(f"expected HOST:PORT, got {listen!r}") from None
    limits = EnrollmentLimits(
        handshake_timeout_s=handshake_timeout_s,
        max_connections=max_connections,
        per_source_connections=per_source_connections,
        per_source_rate=per_source_rate,
    )
    with friendly_errors():
        cfg = ctx.config()
        registry = ctx.registry()
        repository = ctx.repository()
        server = EnrollmentServer(
            _open_ca(ctx),
            TokenStore(cfg.home / "enrollment"),
            repository.root_bytes,
            DeviceBroker(broker_host, broker_port),
            hostnames=hostnames,
            # An explicit empty host (":8443") keeps its old meaning: all interfaces.
            host=host or "0.0.0.0",  # noqa: S104 - the operator asked for every interface
            port=port,
            limits=limits,
            on_refusal=lambda reason, n: registry.bump_counter(f"rejected.enrollment_{reason}", n),
        )
        click.echo(f"enrollment endpoint on {server.url}/v1/enroll; Ctrl-C to stop", err=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            registry.close()


@click.command("token")
@click.argument("device_id")
@click.option(
    "--url",
    required=True,
    envvar="EDGEFLEET_ENROLLMENT_URL",
    help="https://HOST:PORT of `edgefleet enroll-server`, as the device reaches it.",
)
@click.option("--ttl-s", default=86400, show_default=True, type=click.IntRange(1, 30 * 86400))
@click.option("--hardware-class", default="generic", show_default=True)
@click.option("--tag", "tags", multiple=True, help="Tag the device (repeatable).")
@click.option(
    "--state-dir",
    default="/var/lib/edgefleet-agent",
    show_default=True,
    help="State directory the agent will use on the device.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write enrollment.json and agent.toml into.",
)
@json_option
@pass_ctx
def device_token(
    ctx: Context,
    device_id: str,
    url: str,
    ttl_s: int,
    hardware_class: str,
    tags: tuple[str, ...],
    state_dir: str,
    out_dir: Path,
    as_json: bool,
) -> None:
    """Register DEVICE_ID (if new) and write a one-time enrollment token file for it.

    Copy --out's enrollment.json and agent.toml to the device. On its first
    start the agent makes its own key, redeems the token at --url for a
    certificate, and gets the broker address and the TUF root with it.
    """
    from edgefleet.controller.ca import write_private_file, write_public_file
    from edgefleet.controller.enrollment import TokenStore, token_file_document

    if not url.startswith("https://"):
        raise click.BadParameter(f"must start with https://, got {url!r}", param_hint="--url")
    with friendly_errors():
        cfg = ctx.config()
        authority = _open_ca(ctx)
        registry = ctx.registry()
        try:
            registry.enroll_device(device_id, hardware_class=hardware_class, tags=tags)
        except DuplicateError:
            pass  # re-issuing a token for a known device (lost token, new hardware)
        finally:
            registry.close()
        token = TokenStore(cfg.home / "enrollment").create(device_id, ttl_s)
        expires_at = time.time() + ttl_s
        doc = token_file_document(device_id, token, url, authority.cert_pem, expires_at)
        write_private_file(out_dir / "enrollment.json", json.dumps(doc, indent=2).encode())
        lines = [
            f'device_id = "{device_id}"',
            f'state_dir = "{state_dir}"',
            f'hardware_class = "{hardware_class}"',
            "telemetry_interval_s = 10",
            "",
            "[enrollment]   # first start: key, CSR, certificate, broker, TUF root",
            'token_file = "enrollment.json"',
            "",
            "[http]",
            'host = "127.0.0.1"',
            "port = 8470",
        ]
        write_public_file(out_dir / "agent.toml", ("\n".join(lines) + "\n").encode())
    data: dict[str, Any] = {
        "device_id": device_id,
        "token_file": str(out_dir / "enrollment.json"),
        "config": str(out_dir / "agent.toml"),
        "expires_at": expires_at,
    }
    emit(
        as_json,
        data,
        lambda: (
            f"token for {device_id} valid {ttl_s}s, once; copy {out_dir}/enrollment.json and "
            f"{out_dir}/agent.toml to the device and run: edgefleet-agent --config agent.toml"
        ),
    )


@click.command("revoke")
@click.argument("device_id")
@click.option(
    "--crl-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Copy the new CRL here (the broker's crlfile), then SIGHUP mosquitto.",
)
@json_option
@pass_ctx
def device_revoke(ctx: Context, device_id: str, crl_out: Path | None, as_json: bool) -> None:
    """Revoke every certificate of DEVICE_ID and rewrite the CRL the broker reads.

    With --api the running controller revokes (an admin token); the CRL is
    then the controller's, and --crl-out is refused (copy it on that host).
    """
    with friendly_errors():
        api = ctx.api()
        if api is not None:
            if crl_out is not None:
                raise click.UsageError("--crl-out needs the CA on this machine; not with --api")
            reply = api.revoke_device(device_id)
            emit(
                as_json,
                reply,
                lambda: (
                    f"the controller at {api.base_url} revoked "
                    f"{len(reply['revoked_serials'])} certificate(s) of {device_id}; "
                    f"its CRL is {reply['crl']} on that host.\nReload the broker there."
                ),
            )
            return
        authority = _open_ca(ctx)
        revoked = authority.revoke(device_id)
        _copy_crl(authority, crl_out)
    data = {
        "device_id": device_id,
        "revoked_serials": [str(r.serial) for r in revoked],
        "crl": str(crl_out or authority.crl_file),
    }
    emit(
        as_json,
        data,
        lambda: (
            f"revoked {len(revoked)} certificate(s) of {device_id}; CRL at {data['crl']}.\n"
            "Reload the broker: `systemctl reload mosquitto` (SIGHUP; new connections) or "
            "restart it to drop a connected session now."
        ),
    )
