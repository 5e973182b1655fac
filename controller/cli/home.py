"""``edgefleet init`` and ``edgefleet serve``: set up the state directory, run the controller."""

from __future__ import annotations

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import emit, friendly_errors, json_option

__all__ = ["init", "serve"]


@click.command()
@json_option
@pass_ctx
def init(ctx: Context, as_json: bool) -> None:
    """Create the home: registry and TUF repository (keys, root metadata).

    The only command that creates a home; running it again on an existing
    home changes nothing.
    """
    from edgefleet.controller.registry import Registry
    from edgefleet.controller.trust import TrustRepository

    with friendly_errors():
        cfg = ctx.config()
        ctx.create_home()
        Registry(cfg.registry_url).close()
        repo = TrustRepository.open_or_init(cfg.repository_dir)
        data = {
            "home": str(cfg.home),
            "repository": str(repo.root),
            "database_url": cfg.registry_url,
        }
    emit(as_json, data, lambda: "\n".join(f"{k}: {v}" for k, v in data.items()))


@click.command()
@click.option(
    "--embedded-broker",
    is_flag=True,
    help="Also run an embedded MQTT broker (amqtt) on the broker address.",
)
@click.option(
    "--broker-host",
    default=None,
    help="Broker host (with --embedded-broker: the address it listens on). "
    "Default: [broker] host of the config.",
)
@click.option(
    "--broker-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Broker port (with --embedded-broker: the port it listens on). "
    "Default: [broker] port of the config.",
)
@click.option("--api-address", help="Management API HOST:PORT (default: [api] address).")
@click.option("--no-api", is_flag=True, help="Do not serve the management API.")
@click.option(
    "--ingest-workers",
    type=click.IntRange(0, 64),
    default=0,
    help="Store telemetry in N worker processes (MQTT shared subscriptions; N > 1 needs "
    "Mosquitto or EMQX, not --embedded-broker). Default 0: in the controller process.",
)
@pass_ctx
def serve(
    ctx: Context,
    embedded_broker: bool,
    broker_host: str | None,
    broker_port: int | None,
    api_address: str | None,
    no_api: bool,
    ingest_workers: int,
) -> None:
    """Run the controller: publish desired state, serve transfers, ingest telemetry, the API."""
    from dataclasses import replace

    from edgefleet.controller.api.server import start_configured_api
    from edgefleet.controller.broker import EmbeddedBroker
    from edgefleet.controller.cli.context import record_served_broker
    from edgefleet.controller.ingest import start_ingest_workers
    from edgefleet.controller.service import ControllerService

    with friendly_errors():
        cfg = ctx.config()
        broker_settings = cfg.broker
        if broker_host is not None:
            broker_settings = replace(broker_settings, host=broker_host)
        if broker_port is not None:
            broker_settings = replace(broker_settings, port=broker_port)
        repository = ctx.repository()
        registry = ctx.registry()
        broker: EmbeddedBroker | None = None
        if embedded_broker:
            broker = EmbeddedBroker(broker_settings.host, broker_settings.port)
            try:
                broker.start()
            except BaseException:
                registry.close()
                raise
        # `device enroll` without --config gives agents this address.
        record_served_broker(ctx.require_home(), broker_settings.host, broker_settings.port)
        workers = None
        api = None
        try:
            workers = start_ingest_workers(
                ingest_workers, cfg, broker_settings, embedded_broker=broker is not None
            )
            service = ControllerService(
                registry,
                repository,
                broker_settings,
                cfg.service,
                profiles=cfg.device_profiles(),
                ingest_telemetry=workers is None,
            )
            api = start_configured_api(service, cfg, api_address, disabled=no_api)
            click.echo(
                f"controller serving via MQTT {broker_settings.host}:{broker_settings.port}"
                + (" (embedded broker)" if broker else "")
                + (f", API on {api.url}" if api else "")
                + "; Ctrl-C to stop",
                err=True,
            )
            service.run_forever()
        except KeyboardInterrupt:
            pass
        finally:
            if api:
                api.stop()
            if workers is not None:
                workers.stop()
            registry.close()
            if broker is not None:
                broker.stop()
