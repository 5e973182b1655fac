"""``edgefleet model compile``: the compiler as a click command.

The lead attaches :data:`compile_command` to the CLI's ``model`` group. It
prints the report as a table (or JSON with ``--json``) and optionally writes
the chosen variants and ``report.json`` to a directory. Every refusal the
compiler raises on purpose becomes a one-line ``Error: ...`` and exit code 1;
when the refusal comes with a report (nothing passed the gate), the report is
still printed first so the user sees the measurements behind it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from edgefleet.controller.compiler.errors import NoVariantError
from edgefleet.controller.compiler.pipeline import compile_model
from edgefleet.controller.compiler.profiles import (
    BUILTIN_PROFILES,
    OBJECTIVES,
    SIZE_MAX_LATENCY_RATIO,
    Profile,
    get_profile,
    load_profiles,
)
from edgefleet.controller.compiler.report import CompileReport, CompileResult
from edgefleet.protocols.errors import EdgefleetError

__all__ = ["compile_command", "parse_pairs", "with_objective"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def parse_pairs(option: str, values: tuple[str, ...], what: str) -> dict[str, str]:
    """``("a=b", ...)`` to ``{"a": "b"}``; a malformed or repeated key is a usage error."""
    out: dict[str, str] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise click.BadParameter(f"{raw!r} is not {what}", param_hint=option)
        if key in out:
            raise click.BadParameter(f"{key!r} is given twice", param_hint=option)
        out[key] = value
    return out


def with_objective(profile: Profile, objective: str | None) -> Profile:
    """``profile`` with its objective replaced for one compile (``None``: as configured)."""
    return profile if objective is None else dataclasses.replace(profile, objective=objective)


def _write_outputs(result: CompileResult, out_dir: Path, *, every: bool) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    suffix = ".tflite" if result.report.profile.runtime == "tflite" else ".onnx"
    for v in result.chosen if every else result.chosen[:1]:
        path = out_dir / f"{v.profile}.{v.name.replace('+', '-')}{suffix}"
        path.write_bytes(v.model)
        written.append({"name": v.name, "rank": v.metrics.rank, "path": str(path)})
    (out_dir / "report.json").write_text(result.report.to_json() + "\n")
    return written


def _emit(report: CompileReport, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    if as_json:
        body = report.to_dict()
        if extra:
            body.update(extra)
        click.echo(json.dumps(body, indent=2, sort_keys=True))
    else:
        click.echo(report.format_table())


@click.command(
    "compile", short_help="Compile and measure variants for one profile; publishes nothing."
)
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--profile",
    "profile_name",
    required=True,
    help=f"Device profile: {', '.join(BUILTIN_PROFILES)} or one from --profiles.",
)
@click.option(
    "--profiles",
    "profiles_file",
    type=click.Path(path_type=Path),
    help="TOML file with custom [profiles.<name>] tables (added to the built-in ones).",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help=".npz with one array per model input (samples on axis 0), for static int8.",
)
@click.option(
    "--validation",
    type=click.Path(path_type=Path),
    help=".npz like --calibration; every variant is compared with fp32 on it.",
)
@click.option(
    "--tolerance",
    type=float,
    default=0.01,
    show_default=True,
    help="Accuracy gate: every output's score >= 1 - tolerance (see --metric).",
)
@click.option(
    "--metric",
    "metric_specs",
    multiple=True,
    metavar="OUTPUT=METRIC",
    help="How to judge one output (repeatable): top1, topk:K, cosine, mae:X, "
    "threshold:T, exact, or ignore (reported, not gated). Default: chosen from the "
    "output's shape and dtype.",
)
@click.option(
    "--state",
    "state_specs",
    multiple=True,
    metavar="INPUT=OUTPUT",
    help="Stateful model (repeatable): OUTPUT is fed back into INPUT. Validation samples "
    "are then consecutive steps of streams ('stream:id' array marks stream starts); "
    "every model runs its own state and every step is scored.",
)
@click.option(
    "--max-accuracy-drop",
    type=click.FloatRange(0, 1),
    help="With 'label:<output>' arrays in --validation: also fail a variant whose "
    "accuracy is more than this below fp32's (0.01 = 1 point).",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    help="Override the profile's objective for this compile: latency (the fastest variant "
    f"that passes the gate) or size (the smallest, at most {SIZE_MAX_LATENCY_RATIO:g}x "
    "fp32 latency).",
)
@click.option(
    "--recipe",
    "recipe_names",
    multiple=True,
    help="Recipe to try (repeatable); default: auto (all the profile allows).",
)
@click.option(
    "--latency-runs",
    type=click.IntRange(1, 100_000),
    default=50,
    show_default=True,
    help="Interleaved timing rounds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write the chosen variant and report.json here.",
)
@click.option(
    "--all-eligible",
    is_flag=True,
    help="With --output-dir, also write every eligible runner-up variant.",
)
def compile_command(
    *,
    source: Path,
    profile_name: str,
    profiles_file: Path | None,
    calibration: Path | None,
    validation: Path | None,
    tolerance: float,
    metric_specs: tuple[str, ...],
    state_specs: tuple[str, ...],
    max_accuracy_drop: float | None,
    objective: str | None,
    recipe_names: tuple[str, ...],
    latency_runs: int,
    as_json: bool,
    output_dir: Path | None,
    all_eligible: bool,
) -> None:
    """Compile SOURCE (an fp32 ONNX or .tflite model) into accuracy-gated variants for a profile.

    Every candidate the profile allows is built, compared with the fp32 model
    on the validation data, and timed against it on this machine; the report
    says which one is chosen and why the others are not.
    """
    metrics = parse_pairs("--metric", metric_specs, "OUTPUT=METRIC (e.g. prob=threshold:0.5)")
    state = parse_pairs("--state", state_specs, "INPUT=OUTPUT (e.g. state=stateN)")
    try:
        profiles = load_profiles(profiles_file) if profiles_file else None
        profile = with_objective(get_profile(profile_name, profiles), objective)
        result = compile_model(
            source,
            profile,
            calibration=calibration,
            validation=validation,
            tolerance=tolerance,
            metrics=metrics or None,
            state=state or None,
            max_accuracy_drop=max_accuracy_drop,
            recipes=list(recipe_names) or None,
            latency_iterations=latency_runs,
        )
        extra: dict[str, Any] = {}
        if output_dir is not None:
            extra["written"] = _write_outputs(result, output_dir, every=all_eligible)
    except NoVariantError as exc:
        if exc.report is not None:
            _emit(exc.report, as_json)
        raise click.ClickException(_one_line(str(exc))) from None
    except EdgefleetError as exc:
        raise click.ClickException(_one_line(str(exc))) from None
    except OSError as exc:
        raise click.ClickException(
            _one_line(f"{exc.strerror or exc}: {exc.filename or ''}")
        ) from None
    _emit(result.report, as_json, extra)
    if not as_json and output_dir is not None:
        for w in extra["written"]:
            click.echo(f"wrote {w['path']}")
