"""Model compiler: one fp32 source model becomes device-specific, accuracy-gated variants.

Usage::

    from edgefleet.controller.compiler import BUILTIN_PROFILES, compile_model

    result = compile_model(
        "model.onnx",
        BUILTIN_PROFILES["x86-vnni"],
        calibration="calib.npz",
        validation="val.npz",
    )
    print(result.report.format_table())
    best = result.best            # Variant: precision, recipe, model bytes, metrics

The compiler measures and refuses rather than assumes (design section 5):
every candidate is compared with the fp32 source on validation data and
timed against it on this machine, and nothing that fails the gate or (for
the latency objective) runs slower than fp32 is ever chosen.

The ``edgefleet model compile`` command lives in
:mod:`edgefleet.controller.compiler.cli` and is not imported here: the
service and the catalog read profiles and compile without loading click.
"""

from edgefleet.controller.compiler.data import SampleSet, load_samples
from edgefleet.controller.compiler.errors import (
    CompileError,
    DataError,
    NoVariantError,
    ProfileError,
    RecipeError,
    SourceModelError,
    ToleranceError,
)
from edgefleet.controller.compiler.evaluate import Accuracy, LatencyStats, OutputScore
from edgefleet.controller.compiler.pipeline import compile_model, load_source
from edgefleet.controller.compiler.profiles import (
    BUILTIN_PROFILES,
    Profile,
    get_profile,
    load_profiles,
    match_profile,
)
from edgefleet.controller.compiler.recipe_base import BuildInput, Built, Recipe
from edgefleet.controller.compiler.recipes import default_recipes
from edgefleet.controller.compiler.report import (
    Attempt,
    CandidateReport,
    CompileReport,
    CompileResult,
    Variant,
    select,
)
from edgefleet.controller.compiler.source import SourceModel

__all__ = [
    "BUILTIN_PROFILES",
    "Accuracy",
    "Attempt",
    "BuildInput",
    "Built",
    "CandidateReport",
    "CompileError",
    "CompileReport",
    "CompileResult",
    "DataError",
    "LatencyStats",
    "NoVariantError",
    "OutputScore",
    "Profile",
    "ProfileError",
    "Recipe",
    "RecipeError",
    "SampleSet",
    "SourceModel",
    "SourceModelError",
    "ToleranceError",
    "Variant",
    "compile_model",
    "default_recipes",
    "get_profile",
    "load_profiles",
    "load_samples",
    "load_source",
    "match_profile",
    "select",
]
