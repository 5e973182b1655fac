"""The ``edgefleet`` command line.

Readable tables by default, ``--json`` for scripts. Every expected failure
(bad config, unknown model, unreachable broker, corrupt model file) ends in a
one-line ``error: ...`` on stderr and exit status 1, never a traceback.

State lives in ``--home`` (default ``./edgefleet-data``, or
``EDGEFLEET_HOME``): the TUF repository with its keys, and the SQLite
registry unless ``--database-url``/``EDGEFLEET_DATABASE_URL`` names another
database.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from edgefleet import __version__
from edgefleet.protocols.errors import EdgefleetError

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------- output helpers
def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; ``None`` renders as ``-``."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def emit(as_json: bool, data: Any, table: Callable[[], str]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(table())


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(f)


@contextmanager
def friendly_errors() -> Iterator[None]:
    """Turn our errors into ``error: ...`` and exit 1."""
    try:
        yield
    except EdgefleetError as exc:
        raise click.ClickException(str(exc)) from exc
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"{exc}") from exc


# --------------------------------------------------------------------------- context
@dataclass
class Context:
    config_path: Path | None
    home: Path | None
    database_url: str | None

    def config(self) -> Any:
        from edgefleet.controller.config import load_controller_config

        return load_controller_config(
            self.config_path, home=self.home, database_url=self.database_url
        )

    def registry(self) -> Any:
        from edgefleet.controller.registry import Registry

        cfg = self.config()
        cfg.home.mkdir(parents=True, exist_ok=True)
        return Registry(cfg.registry_url)

    def repository(self) -> Any:
        from edgefleet.controller.trust import TrustRepository

        return TrustRepository.open_or_init(self.config().repository_dir)


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    envvar="EDGEFLEET_CONFIG",
    help="Controller config file (TOML).",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="EDGEFLEET_HOME",
    help="State directory (TUF repository, keys, SQLite). Default ./edgefleet-data",
)
@click.option(
    "--database-url",
    envvar="EDGEFLEET_DATABASE_URL",
    help="SQLAlchemy URL of the registry. Default: SQLite in --home.",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.pass_context
def cli(
    ctx: click.Context,
    config_path: Path | None,
    home: Path | None,
    database_url: str | None,
    verbose: int,
) -> None:
    """edgefleet: signed, quantized models for fleets of edge devices."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(config_path, home, database_url)


# --------------------------------------------------------------------------- init / serve
@cli.command()
@json_option
@pass_ctx
def init(ctx: Context, as_json: bool) -> None:
    """Create the registry and the TUF repository (keys, root metadata)."""
    with friendly_errors():
        registry = ctx.registry()
        registry.close()
        repo = ctx.repository()
        data = {
            "home": str(ctx.config().home),
            "repository": str(repo.root),
            "database_url": ctx.config().registry_url,
        }
    emit(as_json, data, lambda: "\n".join(f"{k}: {v}" for k, v in data.items()))


@cli.command()
@click.option(
    "--embedded-broker",
    is_flag=True,
    help="Also run an embedded MQTT broker (amqtt) on the configured port.",
)
@pass_ctx
def serve(ctx: Context, embedded_broker: bool) -> None:
    """Run the controller: publish desired state, serve transfers, ingest telemetry."""
    from edgefleet.controller.broker import EmbeddedBroker
    from edgefleet.controller.service import ControllerService

    with friendly_errors():
        cfg = ctx.config()
        broker = None
        if embedded_broker:
            broker = EmbeddedBroker(cfg.broker.host, cfg.broker.port)
            broker.start()
        registry = ctx.registry()
        service = ControllerService(
            registry, ctx.repository(), cfg.broker, cfg.service, profiles=cfg.device_profiles()
        )
        click.echo(
            f"controller serving via MQTT {cfg.broker.host}:{cfg.broker.port}; Ctrl-C to stop",
            err=True,
        )
        try:
            service.run_forever()
        except KeyboardInterrupt:
            pass
        finally:
            registry.close()
            if broker is not None:
                broker.stop()


# --------------------------------------------------------------------------- models
@cli.group()
def model() -> None:
    """Register and list models."""


@model.command("register")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name, e.g. 'defect-detector'.")
@click.option("--version", "version", required=True, help="Model version, e.g. '1.4.0'.")
@click.option(
    "--profile",
    "profile_names",
    multiple=True,
    help="Compile for this device profile and publish its chosen variant "
    "(repeatable; see `edgefleet model compile --help`).",
)
@click.option(
    "--profiles",
    "profiles_file",
    type=click.Path(exists=True, path_type=Path),
    help="TOML file with custom profiles.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=".npz calibration data (static int8).",
)
@click.option(
    "--validation",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=".npz validation data for the accuracy gate.",
)
@click.option(
    "--tolerance",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Accuracy gate: allowed loss vs fp32 (0.01 = 1%).",
)
@click.option(
    "--hardware-class",
    "hardware_classes",
    multiple=True,
    help="Without --profile: publish the source as-is for these classes (default: generic).",
)
@click.option(
    "--sample",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=".npz with smoke-test inputs named like the model's inputs.",
)
@json_option
@pass_ctx
def model_register(
    ctx: Context,
    source: Path,
    name: str,
    version: str,
    profile_names: tuple[str, ...],
    profiles_file: Path | None,
    calibration: Path | None,
    validation: Path | None,
    tolerance: float,
    hardware_classes: tuple[str, ...],
    sample: Path | None,
    as_json: bool,
) -> None:
    """Register SOURCE (an .onnx file) and publish signed bundles for it.

    With --profile, the model is compiled for each profile first and the
    variant that passes the accuracy gate and runs best is published for that
    profile (plus the fp32 source as the generic fallback); the compile
    reports are stored with the bundles (`edgefleet model report`).
    """
    import numpy as np

    from edgefleet.controller.catalog import register_compiled, register_model
    from edgefleet.controller.compiler import BUILTIN_PROFILES, get_profile, load_profiles

    if profile_names and hardware_classes:
        raise click.UsageError("use --profile (compile) or --hardware-class (as-is), not both")
    with friendly_errors():
        sample_inputs = None
        if sample is not None:
            with np.load(sample, allow_pickle=False) as npz:
                sample_inputs = {k: npz[k] for k in npz.files}
        registry = ctx.registry()
        try:
            if profile_names:
                known = dict(BUILTIN_PROFILES) | ctx.config().device_profiles()
                if profiles_file is not None:
                    known.update(load_profiles(profiles_file))
                profiles = [get_profile(p, known) for p in profile_names]
                compiled = register_compiled(
                    registry,
                    ctx.repository(),
                    source.read_bytes(),
                    name=name,
                    version=version,
                    profiles=profiles,
                    calibration=calibration,
                    validation=validation,
                    tolerance=tolerance,
                    sample_inputs=sample_inputs,
                )
                release, bundles = compiled.version.release, compiled.bundles
                reports = compiled.reports
            else:
                result = register_model(
                    registry,
                    ctx.repository(),
                    source.read_bytes(),
                    name=name,
                    version=version,
                    hardware_classes=hardware_classes or ("generic",),
                    sample_inputs=sample_inputs,
                )
                release, bundles, reports = result.version.release, result.bundles, {}
        finally:
            registry.close()
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "release": release,
        "bundles": [
            {
                "target": b.target_path,
                "hardware_class": b.hardware_class,
                "precision": b.precision,
                "bytes": b.length,
                "sha256": b.sha256,
            }
            for b in bundles
        ],
        "reports": {k: r.to_dict() for k, r in reports.items()},
    }

    def table() -> str:
        parts = [
            f"registered {name}@{version} (release {release})",
            render_table(
                ["target", "hardware class", "precision", "bytes"],
                [
                    [b["target"], b["hardware_class"], b["precision"], b["bytes"]]
                    for b in data["bundles"]
                ],
            ),
        ]
        parts += [f"\ncompile report for {k}:\n{r.format_table()}" for k, r in reports.items()]
        return "\n".join(parts)

    emit(as_json, data, table)


@model.command("report")
@click.argument("name")
@click.argument("version")
@json_option
@pass_ctx
def model_report(ctx: Context, name: str, version: str, as_json: bool) -> None:
    """Show the compile reports stored with NAME VERSION's bundles."""
    from edgefleet.controller.compiler import CompileReport

    with friendly_errors():
        registry = ctx.registry()
        try:
            mv = registry.get_model_version(name, version)
            bundles = registry.bundles_for(mv.id)
        finally:
            registry.close()
    stored = {b.hardware_class: b.report for b in bundles if b.report}
    if as_json:
        emit(True, stored, str)
        return
    if not stored:
        click.echo(f"{name}@{version} was registered without compiling; no reports stored")
        return
    for hardware_class, raw in stored.items():
        click.echo(f"{hardware_class}:\n{CompileReport.from_dict(raw).format_table()}\n")


def _attach_compile() -> None:
    from edgefleet.controller.compiler.cli import compile_command

    model.add_command(compile_command, "compile")


_attach_compile()


@model.command("list")
@json_option
@pass_ctx
def model_list(ctx: Context, as_json: bool) -> None:
    """List registered model versions."""
    with friendly_errors():
        registry = ctx.registry()
        try:
            versions = registry.list_model_versions()
            rows = [
                {
                    "name": v.name,
                    "version": v.version,
                    "release": v.release,
                    "bundles": len(registry.bundles_for(v.id)),
                    "created_at": v.created_at,
                }
                for v in versions
            ]
        finally:
            registry.close()
    emit(
        as_json,
        rows,
        lambda: render_table(
            ["name", "version", "release", "bundles", "created"],
            [[r["name"], r["version"], r["release"], r["bundles"], r["created_at"]] for r in rows],
        ),
    )


# --------------------------------------------------------------------------- devices
@cli.group()
def device() -> None:
    """Enroll devices."""


@device.command("enroll")
@click.argument("device_id")
@click.option("--hardware-class", default="generic", show_default=True)
@click.option("--tag", "tags", multiple=True, help="Tag the device (repeatable).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write the agent's config and trusted root into.",
)
@click.option(
    "--state-dir",
    default="/var/lib/edgefleet-agent",
    show_default=True,
    help="State directory the agent will use on the device.",
)
@json_option
@pass_ctx
def device_enroll(
    ctx: Context,
    device_id: str,
    hardware_class: str,
    tags: tuple[str, ...],
    out_dir: Path,
    state_dir: str,
    as_json: bool,
) -> None:
    """Enroll DEVICE_ID and write its agent.toml and root.json to --out.

    Copy the two files to the device; the TUF root reaches the agent this
    once, out of band, and is updated through TUF's chain of trust after.
    """
    with friendly_errors():
        cfg = ctx.config()
        registry = ctx.registry()
        try:
            registry.enroll_device(device_id, hardware_class=hardware_class, tags=tags)
        finally:
            registry.close()
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "root.json").write_bytes(ctx.repository().root_bytes())
        b = cfg.broker
        lines = [
            f'device_id = "{device_id}"',
            f'state_dir = "{state_dir}"',
            'trust_root = "root.json"',
            f'hardware_class = "{hardware_class}"',
            "telemetry_interval_s = 10",
            "",
            "[broker]",
            f'host = "{b.host}"',
            f"port = {b.port}",
            f"tls = {'true' if b.tls else 'false'}",
            "",
            "[http]",
            'host = "127.0.0.1"',
            "port = 8470",
        ]
        (out_dir / "agent.toml").write_text("\n".join(lines) + "\n")
    data = {
        "device_id": device_id,
        "config": str(out_dir / "agent.toml"),
        "trust_root": str(out_dir / "root.json"),
    }
    emit(
        as_json,
        data,
        lambda: (
            f"enrolled {device_id}; copy {out_dir}/agent.toml and "
            f"{out_dir}/root.json to the device and run: edgefleet-agent --config agent.toml"
        ),
    )


@device.command("events")
@click.argument("device_id")
@click.option("--limit", default=30, show_default=True, type=click.IntRange(1, 10_000))
@json_option
@pass_ctx
def device_events(ctx: Context, device_id: str, limit: int, as_json: bool) -> None:
    """Show DEVICE_ID's recent events, newest first: installs, refusals and why."""
    with friendly_errors():
        registry = ctx.registry()
        try:
            if registry.get_device(device_id) is None:
                raise click.ClickException(f"no device {device_id!r} is enrolled")
            events = registry.events_for(device_id, limit)
        finally:
            registry.close()
    rows = [
        {
            "at": e.at.isoformat(),
            "kind": e.kind,
            "deployment": e.deployment_id,
            "generation": e.generation,
            "code": None if e.error is None else e.error.code,
            "message": None if e.error is None else e.error.message,
            "detail": e.detail,
        }
        for e in events
    ]
    emit(
        as_json,
        rows,
        lambda: render_table(
            ["at", "event", "generation", "code", "message"],
            [
                [
                    r["at"][:19],
                    r["kind"],
                    r["generation"],
                    r["code"],
                    None if r["message"] is None else r["message"][:80],
                ]
                for r in rows
            ],
        ),
    )


def _device_rows(registry: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": s.device_id,
            "online": s.online,
            "hardware_class": s.hardware_class,
            "state": s.state,
            "active_version": s.active_version,
            "desired_version": s.desired_version,
            "inferences": s.inferences,
            "errors": s.errors,
            "p50_ms": s.p50_ms,
            "last_error": s.last_error_code,
            "last_seen": s.last_seen,
        }
        for s in registry.device_summaries()
    ]


@cli.command()
@json_option
@pass_ctx
def devices(ctx: Context, as_json: bool) -> None:
    """List devices with what they run and how they are doing."""
    with friendly_errors():
        registry = ctx.registry()
        try:
            rows = _device_rows(registry)
        finally:
            registry.close()
    emit(
        as_json,
        rows,
        lambda: render_table(
            [
                "device",
                "online",
                "class",
                "state",
                "active",
                "desired",
                "inferences",
                "p50 ms",
                "last error",
            ],
            [
                [
                    r["id"],
                    "yes" if r["online"] else "no",
                    r["hardware_class"],
                    r["state"],
                    r["active_version"],
                    r["desired_version"],
                    r["inferences"],
                    None if r["p50_ms"] is None else f"{r['p50_ms']:.2f}",
                    r["last_error"],
                ]
                for r in rows
            ],
        ),
    )


# --------------------------------------------------------------------------- deploy / status
@cli.command()
@click.argument("name")
@click.argument("version")
@click.option("--device", "device_ids", multiple=True, help="Target device id (repeatable).")
@click.option("--all", "all_devices", is_flag=True, help="Target every enrolled device.")
@json_option
@pass_ctx
def deploy(
    ctx: Context,
    name: str,
    version: str,
    device_ids: tuple[str, ...],
    all_devices: bool,
    as_json: bool,
) -> None:
    """Deploy NAME VERSION: set the desired model of the target devices."""
    from edgefleet.controller.service import publish_desired_states
    from edgefleet.shared.link import MqttLink

    if bool(device_ids) == all_devices:
        raise click.UsageError("give --device ID (repeatable) or --all")
    with friendly_errors():
        cfg = ctx.config()
        registry = ctx.registry()
        try:
            targets = [d.id for d in registry.list_devices()] if all_devices else list(device_ids)
            if not targets:
                raise click.ClickException("no devices enrolled")
            mv = registry.get_model_version(name, version)
            deployment = registry.create_deployment(mv.id, targets)
            published = 0
            link = MqttLink(cfg.broker, f"edgefleet-cli-{deployment.id[:8]}")
            try:
                link.start(wait=True)
                published = publish_desired_states(registry, link)
                link.stop()
            except EdgefleetError as exc:
                click.echo(f"warning: {exc}; `edgefleet serve` will publish it", err=True)
        finally:
            registry.close()
    data = {
        "deployment": deployment.id,
        "model": name,
        "version": version,
        "devices": targets,
        "published": published,
    }
    emit(
        as_json,
        data,
        lambda: (
            f"deployment {deployment.id}: {name}@{version} -> "
            f"{len(targets)} device(s); {published} desired state(s) published"
        ),
    )


def _agent_rejections(counters: dict[str, int]) -> dict[str, int]:
    """Sum the per-device ``agent_rejected.<device>.<reason>`` counters by reason."""
    totals: dict[str, int] = {}
    for name, value in counters.items():
        if name.startswith("agent_rejected."):
            reason = name.rsplit(".", 1)[-1]
            totals[reason] = totals.get(reason, 0) + value
    return totals


@cli.command()
@json_option
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Fleet overview: devices online, version distribution, health."""
    with friendly_errors():
        registry = ctx.registry()
        try:
            fleet = registry.fleet_status()
        finally:
            registry.close()
    data = {
        "devices": fleet.devices,
        "online": fleet.online,
        "offline": fleet.offline,
        "failed": fleet.failed,
        "versions": fleet.versions,
        "inferences": fleet.inferences,
        "errors": fleet.errors,
        "rejected": {
            k.removeprefix("rejected."): v
            for k, v in fleet.counters.items()
            if k.startswith("rejected.")
        },
        "agent_rejected": _agent_rejections(fleet.counters),
    }

    def table() -> str:
        head = (
            f"devices: {fleet.devices} ({fleet.online} online, {fleet.offline} offline, "
            f"{fleet.failed} failed)\ninferences: {fleet.inferences}, errors: {fleet.errors}"
        )
        versions = render_table(["model version", "devices"], sorted(fleet.versions.items()))
        rejected = ", ".join(f"{k}={v}" for k, v in sorted(data["rejected"].items())) or "none"
        by_agents = (
            ", ".join(f"{k}={v}" for k, v in sorted(data["agent_rejected"].items())) or "none"
        )
        rejected += f"\nrefused by agents: {by_agents}"
        return f"{head}\n\n{versions}\n\nrejected messages: {rejected}"

    emit(as_json, data, table)


# --------------------------------------------------------------------------- agent / demo
@cli.group()
def agent() -> None:
    """Run the gateway agent."""


@agent.command("run")
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
def agent_run(config_file: Path) -> None:
    """Run the agent daemon until SIGTERM/SIGINT."""
    from edgefleet.agent.cli import run_agent

    with friendly_errors():
        run_agent(config_file)


@cli.command()
@click.option("--agents", default=5, show_default=True, type=click.IntRange(1, 200))
@click.option(
    "--requests",
    "requests_per_agent",
    default=20,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Inference requests per agent.",
)
@click.option(
    "--broker",
    "broker_addr",
    default=None,
    help="HOST:PORT of an existing broker; default: start an embedded one.",
)
@json_option
def demo(agents: int, requests_per_agent: int, broker_addr: str | None, as_json: bool) -> None:
    """Run the whole path on this machine: broker, controller, N agents, deploy, infer."""
    from edgefleet.controller.demo import run_demo
    from edgefleet.shared.link import BrokerSettings

    broker = None
    if broker_addr:
        host, _, port = broker_addr.rpartition(":")
        try:
            broker = BrokerSettings(host=host or "127.0.0.1", port=int(port))
        except ValueError as exc:
            raise click.BadParameter(f"expected HOST:PORT, got {broker_addr!r}") from exc
    say = (lambda _m: None) if as_json else (lambda m: click.echo(f"* {m}", err=True))
    with friendly_errors():
        result = run_demo(agents, requests_per_agent=requests_per_agent, broker=broker, say=say)
    emit(
        as_json,
        result.to_dict(),
        lambda: (
            render_table(
                ["device", "model version", "variant", "status", "inferences", "p50 ms"],
                [
                    [
                        d.id,
                        d.model_version,
                        d.variant,
                        d.status,
                        d.inferences,
                        None if d.p50_ms is None else f"{d.p50_ms:.3f}",
                    ]
                    for d in result.devices
                ],
            )
            + f"\n\n{'OK' if result.ok else 'FAILED'}: {len(result.devices)} device(s) in "
            f"{result.elapsed_s:.1f}s"
        ),
    )
    if not result.ok:
        sys.exit(1)


# --------------------------------------------------------------------------- feature commands
# Each feature keeps its commands in its own module; register them here, one line each.
def _attach_features() -> None:
    from edgefleet.controller.keys_cli import keys

    cli.add_command(keys)
    from edgefleet.controller import security_cli as sec

    cli.add_command(sec.ca)
    cli.add_command(sec.broker_config)
    cli.add_command(sec.enroll_server)
    device.add_command(sec.device_token)
    device.add_command(sec.device_revoke)
    from edgefleet.controller.rollout.cli import rollout_group

    cli.add_command(rollout_group)


_attach_features()


def main() -> None:
    cli(prog_name="edgefleet")
