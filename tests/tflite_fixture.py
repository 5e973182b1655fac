"""The small float TFLite classifier the tests use, and data that fits it.

``tests/fixtures/tiny_classifier.tflite`` was generated once by
``scripts/make_tflite_fixture.py`` (TensorFlow, trained on the data below) and
is committed, so the test suite never needs TensorFlow. The data generator
lives here, numpy only, and the script imports it, so the model and the data
the tests feed it cannot drift apart.

The task: an 8x8 one-channel image with one bright 4x4 quadrant plus noise;
the class is the index of the bright quadrant (0 top-left, 1 top-right,
2 bottom-left, 3 bottom-right). A trained model gets this nearly always
right, so the fp32 outputs have clear margins and an int8 variant's top-1
agreement is a meaningful check rather than a coin toss.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_classifier.tflite"
INPUT_NAME = "image"
OUTPUT_NAME = "probs"
CLASSES = 4


def quadrant_images(
    count: int, *, seed: int, noise: float = 0.35
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """``count`` images of shape (8, 8, 1) and their labels, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=count)
    images = rng.normal(0.0, noise, size=(count, 8, 8, 1))
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4, 0] += 1.0
    return images.astype(np.float32), labels.astype(np.int64)


def require(module: str, package: str, extra: str) -> None:
    """Skip the calling test when ``module`` is missing; fail instead under CI.

    Like the mosquitto fixture: a developer without the TFLite extras gets a
    clear skip, but CI (``CI=true``) installs ``edgefleet[all]``, which brings
    them, so a missing module there is a broken install, not a reason to skip.
    """
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{package} is not installed (pip install 'edgefleet[{extra}]')"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI installs it with edgefleet[all]")
    pytest.skip(message)


def require_litert() -> None:
    """The TFLite interpreter (ai-edge-litert)."""
    require("ai_edge_litert", "ai-edge-litert", "tflite")


def require_quantizer() -> None:
    """The TFLite quantizer (litert-quantizer)."""
    require("litert_quantizer", "litert-quantizer", "tflite-compiler")
