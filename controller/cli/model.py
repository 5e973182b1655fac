"""``edgefleet model ...``: compile, register (compiled or as-is), list, report, profiles.

``model compile`` is the compiler's own command
(:mod:`edgefleet.controller.compiler.cli`); the group loads it, and with it
numpy and onnx, only when a ``model`` subcommand is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgefleet.controller.cli.context import Context, pass_ctx
from edgefleet.controller.cli.output import emit, friendly_errors, json_option, render_table

__all__ = ["model_group"]


class _ModelGroup(click.Group):
    """The ``model`` group, with ``compile`` attached on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "compile"})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "compile":
            from edgefleet.controller.compiler.cli import compile_command

            return compile_command
        return super().get_command(ctx, cmd_name)


@click.group("model", cls=_ModelGroup, short_help="Compile, register, list and inspect models.")
def model_group() -> None:
    """Compile models for device profiles, publish them as signed bundles, inspect them.

    `model compile` builds and measures the variants for one profile and
    publishes nothing; `model register` compiles for each --profile the same
    way (or takes the model as-is) and publishes signed bundles to deploy.
    """


@model_group.command(
    "register", short_help="Register a model: compile per profile, publish signed bundles."
)
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
    "--metric",
    "metric_specs",
    multiple=True,
    metavar="OUTPUT=METRIC",
    help="With --profile: how to judge one output (repeatable), as `model compile --metric`: "
    "top1, topk:K, cosine, mae:X, threshold:T, exact or ignore.",
)
@click.option(
    "--state",
    "state_specs",
    multiple=True,
    metavar="INPUT=OUTPUT",
    help="With --profile: stateful model, OUTPUT fed back into INPUT (repeatable); "
    "--validation then holds whole streams, as `model compile --state`.",
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(0, 1),
    help="With --profile and 'label:<output>' arrays in --validation: also fail a variant "
    "whose accuracy is more than this below fp32's (0.01 = 1 point).",
)
@click.option(
    # The choices are the compiler's OBJECTIVES (a test holds them equal); the
    # compiler is not imported here so that `edgefleet --help` stays fast.
    "--objective",
    type=click.Choice(("latency", "size")),
    help="With --profile: override every named profile's objective: latency (fastest "
    "passing variant) or size (smallest passing variant; see `model compile --help`).",
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
    metric_specs: tuple[str, ...],
    state_specs: tuple[str, ...],
    max_accuracy_drop: float | None,
    objective: str | None,
    hardware_classes: tuple[str, ...],
    sample: Path | None,
    as_json: bool,
) -> None:
    """Register a model and publish signed bundles, compiled per --profile or as-is.

    SOURCE is an .onnx or .tflite file. With --profile, the model is compiled
    for each profile first and the variant that passes the accuracy gate and
    best meets the profile's objective is published for that profile (plus
    the fp32 source as the generic fallback); the compile reports are stored
    with the bundles (`edgefleet model report`). --metric, --state,
    --max-accuracy-drop and --objective judge and choose variants exactly as
    in `edgefleet model compile`.
    """
    from edgefleet.controller.catalog import register_compiled, register_model
    from edgefleet.controller.compiler import (
        BUILTIN_PROFILES,
        CompileReport,
        get_profile,
        load_profiles,
    )
    from edgefleet.controller.compiler.cli import parse_pairs, with_objective

    # The compiler's .npz reader turns every way a data file can be bad into a
    # DataError, so a wrong --sample file is a one-line error, not a traceback.
    from edgefleet.controller.compiler.data import _load_npz as load_npz

    if profile_names and hardware_classes:
        raise click.UsageError("use --profile (compile) or --hardware-class (as-is), not both")
    judging = [
        option
        for option, given in (
            ("--metric", metric_specs),
            ("--state", state_specs),
            ("--max-accuracy-drop", max_accuracy_drop is not None),
            ("--objective", objective is not None),
        )
        if given
    ]
    if judging and not profile_names:
        raise click.UsageError(
            f"{', '.join(judging)} only apply when compiling: give --profile as well"
        )
    metrics = parse_pairs("--metric", metric_specs, "OUTPUT=METRIC (e.g. prob=threshold:0.5)")
    state = parse_pairs("--state", state_specs, "INPUT=OUTPUT (e.g. state=stateN)")
    with friendly_errors():
        sample_inputs = None
        if sample is not None:
            sample_inputs = load_npz(sample, "sample")
        registry = ctx.registry()
        reports: dict[str, CompileReport]
        try:
            if profile_names:
                known = dict(BUILTIN_PROFILES) | ctx.config().device_profiles()
                if profiles_file is not None:
                    known.update(load_profiles(profiles_file))
                profiles = [with_objective(get_profile(p, known), objective) for p in profile_names]
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
                    metrics=metrics or None,
                    state=state or None,
                    max_accuracy_drop=max_accuracy_drop,
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


@model_group.command("report")
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


@model_group.command("list")
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


@model_group.command("profiles", short_help="List the device profiles: built-in and configured.")
@click.option(
    "--profiles",
    "profiles_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also list this TOML file's [profiles.<name>] tables (as `model compile --profiles`).",
)
@json_option
@pass_ctx
def model_profiles(ctx: Context, profiles_file: Path | None, as_json: bool) -> None:
    """List the device profiles models can be compiled for: built-in and configured.

    Configured profiles come from the controller config's ``profiles`` file
    and from --profiles; one with a built-in profile's name replaces it, and
    the listing says so.
    """
    from edgefleet.controller.compiler import BUILTIN_PROFILES, load_profiles

    with friendly_errors():
        listed: dict[str, dict[str, Any]] = {
            name: {**p.to_dict(), "source": "built-in"} for name, p in BUILTIN_PROFILES.items()
        }
        files = [ctx.config().profiles_file, profiles_file]
        for path in (f for f in files if f is not None):
            for name, p in load_profiles(path, include_builtin=False).items():
                entry: dict[str, Any] = {**p.to_dict(), "source": str(path)}
                if name in listed:
                    entry["replaces"] = listed[name]["source"]
                listed[name] = entry
    rows = list(listed.values())

    def table() -> str:
        return render_table(
            ["name", "source", "runtime", "arch", "features", "precisions", "objective", "max"],
            [
                [
                    r["name"],
                    r["source"] + (f" (replaces {r['replaces']})" if "replaces" in r else ""),
                    r["runtime"],
                    r["arch"],
                    ",".join(r["cpu_features"]) or "-",
                    "/".join(r["precisions"]),
                    r.get("objective"),
                    r.get("max_bundle_bytes"),
                ]
                for r in rows
            ],
        )

    emit(as_json, rows, table)
