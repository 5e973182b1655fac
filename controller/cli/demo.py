"""``edgefleet demo``: the whole path on one machine, from broker to inference."""

from __future__ import annotations

import json
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
@click.option(
    "--dashboard",
    is_flag=True,
    help="Keep the fleet running and serve the web dashboard; print its URL and a token. "
    "Runs until Ctrl-C.",
)
@click.option(
    "--api-address",
    default="127.0.0.1:0",
    show_default=True,
    help="HOST:PORT for the dashboard and API with --dashboard (port 0: a free one).",
)
@json_option
def demo(
    agents: int,
    requests_per_agent: int,
    broker_addr: str | None,
    dashboard: bool,
    api_address: str,
    as_json: bool,
) -> None:
    """Run the whole path on this machine: broker, controller, N agents, deploy, infer.

    With --dashboard the fleet keeps running (embedded broker on a free port,
    SQLite in a temporary directory) behind the web dashboard, with an
    operator token printed to sign in with, until Ctrl-C.
    """
    from edgefleet.controller.demo import DashboardSession, DemoFleet, run_demo, serve_dashboard
    from edgefleet.shared.link import BrokerSettings

    broker = None
    if broker_addr:
        host, _, port = broker_addr.rpartition(":")
        try:
            broker = BrokerSettings(host=host or "127.0.0.1", port=int(port))
        except ValueError as exc:
            raise click.BadParameter(f"expected HOST:PORT, got {broker_addr!r}") from exc
    say = (lambda _m: None) if as_json else (lambda m: click.echo(f"* {m}", err=True))
    hold = None
    if dashboard:

        def ready(session: DashboardSession) -> None:
            if as_json:
                click.echo(json.dumps({"url": session.url, "token": session.token}), nl=True)
            else:
                click.echo(
                    f"\nDashboard: {session.url}\n"
                    f"Sign in with this {session.role} token (shown once):\n\n"
                    f"  {session.token}\n\n"
                    "The fleet keeps running, with inference traffic, until Ctrl-C."
                )
            sys.stdout.flush()

        def hold(fleet: DemoFleet) -> None:
            serve_dashboard(fleet, address=api_address, say=say, ready=ready)

    with friendly_errors():
        try:
            result = run_demo(
                agents, requests_per_agent=requests_per_agent, broker=broker, say=say, hold=hold
            )
        except KeyboardInterrupt:
            click.echo("\nstopped: the demo fleet is shut down", err=True)
            return
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
