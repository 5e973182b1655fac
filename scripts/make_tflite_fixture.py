#!/usr/bin/env python3
"""Generate ``tests/fixtures/tiny_classifier.tflite`` (run once; the output is committed).

The test suite must not need TensorFlow, so the float TFLite fixture is made
here, with TensorFlow, and checked in. Run it in a throwaway environment::

    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu numpy
    /tmp/tfvenv/bin/python scripts/make_tflite_fixture.py

The model is a tiny CNN (Conv2D -> MaxPool -> Dense -> Dense -> Softmax,
about 10 KB) *trained* on the quadrant task of ``tests/tflite_fixture.py``:
trained weights give clear output margins, so quantized variants are judged
on something like a real model rather than on random weights where top-1
flips at every rounding. Seeds and op determinism are fixed, but TensorFlow
versions may still differ in the last bits, which is why the file is
committed instead of regenerated in CI.

The converted model has one signature, ``serving_default``, with the input
``image`` ([batch, 8, 8, 1] float32, dynamic batch) and the output ``probs``
([batch, 4] float32). No optimisation is applied: it is the fp32 source the
compiler quantizes.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests.tflite_fixture import (  # noqa: E402
    CLASSES,
    FIXTURE,
    INPUT_NAME,
    OUTPUT_NAME,
    quadrant_images,
)


def build_model() -> tf.keras.Model:
    inputs = tf.keras.Input(shape=(8, 8, 1), name=INPUT_NAME)
    x = tf.keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = tf.keras.layers.MaxPooling2D(2)(x)
    x = tf.keras.layers.Flatten()(x)
    x = tf.keras.layers.Dense(16, activation="relu")(x)
    x = tf.keras.layers.Dense(CLASSES)(x)
    outputs = tf.keras.layers.Softmax(name=OUTPUT_NAME)(x)
    return tf.keras.Model(inputs, outputs)


def convert(model: tf.keras.Model) -> bytes:
    """Convert with the trained weights baked in as constants.

    Converting the Keras 3 model directly keeps its weights as resource
    variables (``VAR_HANDLE``/``READ_VARIABLE`` ops) that no quantizer
    touches, so the serving function is rebuilt from plain TF ops on
    constant weights; the converter then emits the usual ``CONV_2D``,
    ``MAX_POOL_2D``, ``FULLY_CONNECTED`` and ``SOFTMAX`` builtins.
    """
    conv, _, _, dense1, dense2, _ = model.layers[1:]
    k, kb = (tf.constant(w) for w in conv.get_weights())
    w1, b1 = (tf.constant(w) for w in dense1.get_weights())
    w2, b2 = (tf.constant(w) for w in dense2.get_weights())

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 1], tf.float32, name=INPUT_NAME)])
    def serve(image: tf.Tensor) -> dict[str, tf.Tensor]:
        x = tf.nn.relu(tf.nn.conv2d(image, k, strides=1, padding="SAME") + kb)
        x = tf.nn.max_pool2d(x, 2, 2, padding="VALID")
        x = tf.reshape(x, [-1, 4 * 4 * 4])
        x = tf.nn.relu(tf.matmul(x, w1) + b1)
        return {OUTPUT_NAME: tf.nn.softmax(tf.matmul(x, w2) + b2)}

    reference = model.predict(quadrant_images(16, seed=9)[0], verbose=0)
    rebuilt = serve(tf.constant(quadrant_images(16, seed=9)[0]))[OUTPUT_NAME].numpy()
    if not np.allclose(reference, rebuilt, atol=1e-5):
        raise SystemExit("the rebuilt serving function does not match the Keras model")
    holder = tf.Module()
    holder.serve = serve
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [serve.get_concrete_function()], holder
    )
    data: bytes = converter.convert()
    return data


def main() -> None:
    tf.keras.utils.set_random_seed(7)
    tf.config.experimental.enable_op_determinism()
    x_train, y_train = quadrant_images(1024, seed=1)
    x_test, y_test = quadrant_images(256, seed=2)
    model = build_model()
    model.compile(
        optimizer=tf.keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0, shuffle=True)
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))

    data = convert(model)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE.write_bytes(data)
    print(
        f"wrote {FIXTURE.relative_to(ROOT)}: {len(data)} bytes, "
        f"sha256 {hashlib.sha256(data).hexdigest()}, test accuracy {accuracy:.3f}, "
        f"tensorflow {tf.__version__}"
    )


if __name__ == "__main__":
    main()
