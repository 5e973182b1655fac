"""``edgefleet agent run`` and ``edgefleet agent package``: the gateway agent from the CLI.

``package`` builds an offline installer for one gateway platform
(:mod:`edgefleet.controller.packaging`).

The controller never imports the agent (the layers contract in
``docs/architecture.md``): this command replaces its own process with the
agent's entry point, ``python -m edgefleet.agent.cli``, the same program as
``edgefleet-agent``. Replacing rather than spawning keeps the process id, so
SIGTERM from a service manager reaches the agent directly, and the agent's
exit status is the command's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import emit, friendly_errors, json_option

__all__ = ["AGENT_MODULE", "agent_argv", "agent_group"]

AGENT_MODULE = "edgefleet.agent.cli"
"""The module ``python -m`` runs: the agent's own command line (``edgefleet-agent``)."""


def agent_argv(config_file: Path, *, verbose: int = 0) -> list[str]:
    """The command line that runs the agent with this interpreter.

    ``-vv`` on ``edgefleet`` (debug) becomes the agent's ``-v`` (debug); the
    agent logs at info level otherwise.
    """
    argv = [sys.executable, "-m", AGENT_MODULE, "--config", str(config_file)]
    if verbose >= 2:
        argv.append("-v")
    return argv


@click.group("agent")
def agent_group() -> None:
    """Run the gateway agent, or package it for an offline gateway."""


@agent_group.command("run")
@click.option(
    "--config",
    "config_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@pass_ctx
def agent_run(ctx: Context, config_file: Path) -> None:
    """Run the agent daemon until SIGTERM/SIGINT."""
    argv = agent_argv(config_file, verbose=ctx.verbose)
    sys.stdout.flush()
    sys.stderr.flush()
    with friendly_errors():
        os.execv(argv[0], argv)  # noqa: S606 - our own interpreter and module, no shell


def _progress(message: str) -> None:
    click.echo(f"... {message}", err=True)


@agent_group.command("package")
@click.option(
    "--platform",
    "platform_key",
    required=True,
    type=click.Choice(["linux-x86_64", "linux-aarch64", "linux-armv7l"]),
    help="The gateway's OS/architecture (README, 'Supported gateway platforms').",
)
@click.option(
    "--runtime",
    required=True,
    type=click.Choice(["onnx", "tflite"]),
    help="The inference runtime to install (onnx: onnxruntime; tflite: LiteRT/tflite-runtime).",
)
@click.option(
    "--config-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="What `edgefleet device enroll ID --out DIR` (agent.toml + root.json) or "
    "`edgefleet device token ID --url URL --out DIR` (agent.toml + enrollment.json) wrote.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The archive to write, e.g. gw.tar.gz.",
)
@click.option(
    "--python-version",
    default=None,
    help="The gateway's CPython, e.g. 3.11 [default: 3.11 on ARM, this Python on x86-64].",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="EDGEFLEET_PACKAGE_CACHE",
    help="Where downloaded wheels are kept for the next build "
    "[default: $EDGEFLEET_PACKAGE_CACHE or ~/.cache/edgefleet/packages].",
)
@click.option("--index-url", default=None, help="Package index to resolve against (pip's).")
@click.option(
    "--edgefleet-wheel",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Ship this edgefleet wheel instead of building one from the source tree.",
)
@click.option(
    "--unit-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The systemd unit to ship [default: deploy/edgefleet-agent.service of the source tree].",
)
@json_option
@pass_ctx
def agent_package(
    ctx: Context,
    platform_key: str,
    runtime: str,
    config_dir: Path,
    out: Path,
    python_version: str | None,
    cache_dir: Path | None,
    index_url: str | None,
    edgefleet_wheel: Path | None,
    unit_file: Path | None,
    as_json: bool,
) -> None:
    """Build an offline installer of the agent for one gateway platform.

    The archive holds a wheelhouse for that platform, the device's config from
    --config-dir, the hardened systemd unit and install.sh, which installs it all
    with no network: `tar xzf gw.tar.gz && sudo ./edgefleet-agent-*/install.sh`.
    """
    from edgefleet.controller import packaging

    with friendly_errors():
        target = packaging.resolve_target(platform_key, runtime, python_version)
        source = packaging.find_source_dir()
        if unit_file is None:
            if source is None or not (source / "deploy" / packaging.UNIT_NAME).is_file():
                raise click.UsageError(
                    "no source tree with deploy/edgefleet-agent.service; pass --unit-file"
                )
            unit_file = source / "deploy" / packaging.UNIT_NAME
        options = packaging.PackageOptions(
            target=target,
            config_dir=config_dir,
            out=out,
            cache_dir=cache_dir or packaging.default_cache_dir(),
            unit_file=unit_file,
            source_dir=source,
            edgefleet_wheel=edgefleet_wheel,
            pip_args=("--index-url", index_url) if index_url else (),
        )
        show = ctx.verbose > 0 or sys.stderr.isatty()
        result = packaging.build_package(options, progress=_progress if show else lambda _m: None)
    data = result.to_dict()
    emit(
        as_json,
        data,
        lambda: (
            f"wrote {result.out} ({result.size_bytes / 1e6:.1f} MB, {len(result.wheels)} wheels "
            f"for {target.platform.key} CPython {target.python}, runtime {runtime}; "
            f"{result.downloaded} downloaded, the rest from the cache) for {result.device_id} "
            f"in {result.seconds:.0f}s.\n"
            f"On the gateway: tar xzf {result.out.name} && "
            f"sudo ./edgefleet-agent-{target.platform.key}-{runtime}/install.sh"
        ),
    )
