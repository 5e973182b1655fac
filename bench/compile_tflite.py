"""Benchmark the TFLite side of the compiler on the committed fixture and print the results.

Compiles ``tests/fixtures/tiny_classifier.tflite`` (a ~7 KB trained CNN) for
the ``arm64-litert`` profile with calibration and validation data from
``tests/tflite_fixture.py`` and prints a Markdown section for BENCHMARKS.md.
It prints rather than rewrites the file: ``bench/compile_models.py`` owns the
"## Model compiler" section and rewrites it whole.

Run from the repository root with the ``tflite-compiler`` extra installed::

    python bench/compile_tflite.py

This is a script, not a test: latencies depend on the machine and its load.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgefleet.controller.compiler import BUILTIN_PROFILES, compile_model  # noqa: E402
from tests.tflite_fixture import FIXTURE, INPUT_NAME, quadrant_images  # noqa: E402


def main() -> None:
    rounds, warmup = 200, 10
    result = compile_model(
        FIXTURE,
        BUILTIN_PROFILES["arm64-litert"],
        calibration={INPUT_NAME: quadrant_images(64, seed=11)[0]},
        validation={INPUT_NAME: quadrant_images(300, seed=12)[0]},
        latency_iterations=rounds,
        latency_warmup=warmup,
    )
    report = result.report
    host = report.host
    print("## Model compiler: TFLite\n")
    print("Command: `python bench/compile_tflite.py` (prints this section).")
    print(
        f"Machine: {host['cpu']} ({'/'.join(host['features'])}), {host['arch']}, "
        f"ai-edge-litert {host.get('ai-edge-litert')}, "
        f"litert-quantizer {host.get('litert-quantizer')}"
    )
    print(
        f"Source `tests/fixtures/tiny_classifier.tflite`, {report.source['size_bytes']} bytes "
        f"({report.source['weight_bytes']} bytes of float weights), profile `arm64-litert` "
        f"measured on this x86 host; {rounds} interleaved rounds, 1 interpreter thread, "
        f"batch 1, {warmup} warm-up runs; {report.validation_samples} validation / "
        f"{report.calibration_samples} calibration samples.\n"
    )
    print(
        "| candidate | prec | size B | size vs fp32 | accuracy vs fp32 | p50 ms "
        "| p50 vs fp32 | status |"
    )
    print("|---|---|---:|---:|---|---:|---:|---|")
    for c in report.candidates:
        acc = c.accuracy.summary if c.accuracy else ""
        p50 = f"{c.latency.p50_ms:.4f}" if c.latency else ""
        ratio = f"{c.latency_ratio:.2f}x" if c.latency_ratio is not None else ""
        size = f"{c.size_ratio:.2f}x" if c.size_ratio is not None else ""
        print(
            f"| {c.name} | {c.precision} | {c.size_bytes or ''} | {size} | {acc} | {p50} | "
            f"{ratio} | {c.status}: {c.reason or ''} |"
        )


if __name__ == "__main__":
    main()
