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


@click.command()
@click.option(
    "--embedded-broker",
    is_flag=True,
    help="Also run an embedded MQTT broker (amqtt) on the configured port.",
)
@click.option("--api-address", help="Management API HOST:PORT (default: [api] address).")
@click.option("--no-api", is_flag=True, help="Do not serve the management API.")
@pass_ctx
def serve(ctx: Context, embedded_broker: bool, api_address: str | None, no_api: bool) -> None:
    """Run the controller: publish desired state, serve transfers, ingest telemetry, the API."""
    from edgefleet.controller.api.server import start_configured_api
    from edgefleet.controller.broker import EmbeddedBroker
    from edgefleet.controller.service import ControllerService

    with friendly_errors():
        cfg = ctx.config()
        broker: EmbeddedBroker | None = None
        if embedded_broker:
            broker = EmbeddedBroker(cfg.broker.host, cfg.broker.port)
            broker.start()
        registry = ctx.registry()
        service = ControllerService(
            registry, ctx.repository(), cfg.broker, cfg.service, profiles=cfg.device_profiles()
        )
        api = None
        try:
            api = start_configured_api(service, cfg, api_address, disabled=no_api)
            click.echo(
                f"controller serving via MQTT {cfg.broker.host}:{cfg.broker.port}"
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
            registry.close()
            if broker is not None:
                broker.stop()
