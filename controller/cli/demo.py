"""``edgefleet demo``: the whole path on one machine, from broker to inference."""

from __future__ import annotations

import sys

import click

from edgefleet.controller.cli.output import emit, friendly_errors, json_option, render_table

__all__ = ["demo"]


@click.command()
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
