""".tflite sources as real exporters write them (issue 13): each test rebuilds one pattern.

Public MediaPipe models (face detector, selfie segmenter, iris landmarks)
were never quantized: every quantized candidate failed and the source
shipped unchanged. Each pattern behind that is rebuilt here as a small model,
offline, with the flatbuffer object API ai-edge-litert ships:

* **old-schema operator codes**: the op only in ``deprecated_builtin_code``
  with ``builtin_code`` 0 (ADD), as schema-v3 exporters write them;
* **no signature** (MediaPipe and older TF exports have none);
* **fp16 weights** stored as FLOAT16 constants behind DEQUANTIZE ops;
* **depthwise and regular convolutions** (the MediaPipe backbones).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgefleet.controller.compiler import BUILTIN_PROFILES, compile_model, load_samples, load_source
from edgefleet.controller.compiler.recipe_base import BuildInput
from edgefleet.controller.compiler.tflite import (
    TfliteQuantRecipe,
    asymmetric_conv_weights,
    inspect_tflite,
    make_tflite_session,
    normalize_tflite,
    tflite_recipes,
)
from tests.tflite_fixture import FIXTURE, quadrant_images, require_litert, require_quantizer

LITERT = BUILTIN_PROFILES["arm64-litert"]
FAST: dict[str, Any] = {"latency_iterations": 3, "latency_warmup": 1}


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_litert()
    require_quantizer()


# --------------------------------------------------------------------------- pattern builders
def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def _read(data: bytes) -> Any:
    from ai_edge_litert.tools import flatbuffer_utils as fu

    return fu.read_model_from_bytearray(bytearray(data))


def _write(model: Any) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils as fu

    return bytes(fu.convert_object_to_bytearray(model))


def old_schema(data: bytes) -> bytes:
    """Every op code only in the deprecated field, ``builtin_code`` 0, as schema v3 wrote them."""
    model = _read(data)
    for oc in model.operatorCodes:
        code = max(oc.builtinCode, oc.deprecatedBuiltinCode)
        assert code < 127
        oc.deprecatedBuiltinCode, oc.builtinCode = code, 0
    return _write(model)


def without_signatures(data: bytes) -> bytes:
    model = _read(data)
    model.signatureDefs = []
    return _write(model)


def with_fp16_weights(data: bytes) -> tuple[bytes, int]:
    """Store every float weight (rank >= 2 constant) as fp16 behind a DEQUANTIZE op."""
    schema = _schema()
    model = _read(data)
    dq = schema.OperatorCodeT()
    dq.builtinCode = dq.deprecatedBuiltinCode = schema.BuiltinOperator.DEQUANTIZE
    dq.version = 1
    model.operatorCodes.append(dq)
    dq_index = len(model.operatorCodes) - 1
    graph = model.subgraphs[0]
    new_ops = []
    for ti in range(len(graph.tensors)):
        tensor = graph.tensors[ti]
        data32 = model.buffers[tensor.buffer].data
        if tensor.type != schema.TensorType.FLOAT32 or data32 is None or len(tensor.shape) < 2:
            continue
        values = np.frombuffer(np.asarray(data32, np.uint8).tobytes(), np.float32)
        buf = schema.BufferT()
        buf.data = np.frombuffer(values.astype(np.float16).tobytes(), np.uint8)
        model.buffers.append(buf)
        half = schema.TensorT()
        half.name, half.shape, half.type = (
            f"{ti}_fp16".encode(),
            list(tensor.shape),
            schema.TensorType.FLOAT16,
        )
        half.buffer = len(model.buffers) - 1
        graph.tensors.append(half)
        tensor.buffer = 0  # now computed by the DEQUANTIZE op
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = dq_index, [len(graph.tensors) - 1], [ti]
        new_ops.append(op)
    graph.operators = new_ops + list(graph.operators)
    return _write(model), len(new_ops)


def depthwise_cnn(seed: int = 0) -> bytes:
    """DEPTHWISE_CONV_2D 3x3 x4 -> CONV_2D 1x1 -> RESHAPE -> FULLY_CONNECTED -> SOFTMAX.

    Operator codes in the deprecated field only (schema v3), no signature.

    Input ``image`` [1, 8, 8, 1]; weights fitted nowhere but scaled like a
    trained layer's (He init), so int8 rounding changes outputs only slightly.
    """
    schema = _schema()
    rng = np.random.default_rng(seed)
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    graph = schema.SubGraphT()
    graph.tensors, graph.operators = [], []

    def tensor(name: str, shape: list[int], value: np.ndarray | None = None, kind: int = 0) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), shape, kind, 0
        if value is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8)
            model.buffers.append(buf)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    codes: dict[int, int] = {}

    def op(code: int, ins: list[int], outs: list[int], kind: int, options: Any) -> None:
        if code not in codes:
            oc = schema.OperatorCodeT()
            oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = 0, code, 1  # schema v3 style
            model.operatorCodes = [*(model.operatorCodes or []), oc]
            codes[code] = len(model.operatorCodes) - 1
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes[code], ins, outs
        o.builtinOptionsType, o.builtinOptions = kind, options
        graph.operators.append(o)

    f32 = np.float32
    x = tensor("image", [1, 8, 8, 1])
    dw_w = tensor("dw_w", [1, 3, 3, 4], (rng.normal(0, np.sqrt(2 / 9), (1, 3, 3, 4))).astype(f32))
    dw_b = tensor("dw_b", [4], rng.normal(0, 0.1, 4).astype(f32))
    dw_o = tensor("dw_out", [1, 8, 8, 4])
    dwo = schema.DepthwiseConv2DOptionsT()
    dwo.padding, dwo.strideW, dwo.strideH, dwo.depthMultiplier = schema.Padding.SAME, 1, 1, 4
    dwo.dilationWFactor = dwo.dilationHFactor = 1
    dwo.fusedActivationFunction = schema.ActivationFunctionType.RELU
    op(schema.BuiltinOperator.DEPTHWISE_CONV_2D, [x, dw_w, dw_b], [dw_o],
       schema.BuiltinOptions.DepthwiseConv2DOptions, dwo)  # fmt: skip
    c_w = tensor("conv_w", [8, 1, 1, 4], rng.normal(0, np.sqrt(2 / 4), (8, 1, 1, 4)).astype(f32))
    c_b = tensor("conv_b", [8], rng.normal(0, 0.1, 8).astype(f32))
    c_o = tensor("conv_out", [1, 8, 8, 8])
    co = schema.Conv2DOptionsT()
    co.padding, co.strideW, co.strideH = schema.Padding.SAME, 1, 1
    co.dilationWFactor = co.dilationHFactor = 1
    co.fusedActivationFunction = schema.ActivationFunctionType.RELU
    op(
        schema.BuiltinOperator.CONV_2D,
        [dw_o, c_w, c_b],
        [c_o],
        schema.BuiltinOptions.Conv2DOptions,
        co,
    )
    shape = tensor("flat_shape", [2], np.array([1, 512], np.int32), kind=schema.TensorType.INT32)
    flat = tensor("flat", [1, 512])
    ro = schema.ReshapeOptionsT()
    ro.newShape = [1, 512]
    op(
        schema.BuiltinOperator.RESHAPE,
        [c_o, shape],
        [flat],
        schema.BuiltinOptions.ReshapeOptions,
        ro,
    )
    fc_w = tensor("fc_w", [4, 512], rng.normal(0, np.sqrt(1 / 512), (4, 512)).astype(f32))
    fc_b = tensor("fc_b", [4], np.zeros(4, f32))
    logits = tensor("logits", [1, 4])
    fo = schema.FullyConnectedOptionsT()
    op(schema.BuiltinOperator.FULLY_CONNECTED, [flat, fc_w, fc_b], [logits],
       schema.BuiltinOptions.FullyConnectedOptions, fo)  # fmt: skip
    probs = tensor("probs", [1, 4])
    so = schema.SoftmaxOptionsT()
    so.beta = 1.0
    op(schema.BuiltinOperator.SOFTMAX, [logits], [probs], schema.BuiltinOptions.SoftmaxOptions, so)
    graph.inputs, graph.outputs = [x], [probs]
    model.subgraphs = [graph]
    model.description = b"edgefleet test: depthwise CNN, schema-v3 op codes, no signature"
    return _write(model)


def _images(count: int, seed: int, name: str = "image") -> dict[str, np.ndarray]:
    return {name: quadrant_images(count, seed=seed)[0]}


def _input_name(data: bytes) -> str:
    """A signature-less model names its input after the tensor (``serving_default_image:0``)."""
    return load_source(data).inputs[0].name


def _build(recipe: TfliteQuantRecipe, data: bytes, calibration: int = 16) -> Any:
    source = load_source(data)
    cal = load_samples(
        _images(calibration, seed=3, name=_input_name(data)), source, role="calibration"
    )
    return recipe.build(BuildInput(source=source, prepared=None, calibration=cal))


def _outputs(data: bytes, images: np.ndarray) -> np.ndarray:
    session, name = make_tflite_session(data), _input_name(data)
    return np.concatenate(
        [session.run(None, {name: images[i : i + 1]})[0] for i in range(len(images))]
    )


def _conv_weight_types(data: bytes) -> dict[str, str]:
    """Op name -> dtype of its weight tensor (input 1), for conv and FC ops."""
    schema = _schema()
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    model = _read(data)
    graph = model.subgraphs[0]

    def name_of(o: Any) -> str:
        code = model.operatorCodes[o.opcodeIndex]
        return str(ops[max(code.builtinCode, code.deprecatedBuiltinCode)])

    # weight-only models compute in float: int8 constant -> DEQUANTIZE -> the op
    produced = {o.outputs[0]: o.inputs[0] for o in graph.operators if name_of(o) == "DEQUANTIZE"}
    out = {}
    for o in graph.operators:
        if name_of(o) in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            weight = produced.get(o.inputs[1], o.inputs[1])
            out[name_of(o)] = types[graph.tensors[weight].type]
    return out


# --------------------------------------------------------------------------- tests
def test_the_patterns_run_in_the_interpreter_as_built() -> None:
    """The rebuilt patterns are valid models: the interpreter loads and runs each."""
    images = _images(4, seed=1)["image"]
    ref = _outputs(FIXTURE.read_bytes(), images)
    for variant in (old_schema(FIXTURE.read_bytes()), without_signatures(FIXTURE.read_bytes()),
                    with_fp16_weights(FIXTURE.read_bytes())[0]):  # fmt: skip
        np.testing.assert_allclose(_outputs(variant, images), ref, atol=2e-3)
    probs = _outputs(depthwise_cnn(), images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_old_schema_opcodes_weight_only_quantizes_conv_and_depthwise_weights() -> None:
    """Was: 'the quantizer left every weight in float: nothing to gain'."""
    source = depthwise_cnn()
    assert inspect_tflite(source).op_counts["DEPTHWISE_CONV_2D"] == 1
    built = _build(TfliteQuantRecipe("weight_only", 8), source)
    assert _conv_weight_types(built.model) == {
        "CONV_2D": "INT8", "DEPTHWISE_CONV_2D": "INT8", "FULLY_CONNECTED": "INT8"
    }  # fmt: skip
    assert len(built.model) < len(source) / 2
    assert any("deprecated schema field" in n for n in built.notes)
    images = _images(32, seed=5)["image"]
    ref, got = _outputs(source, images), _outputs(built.model, images)
    assert np.abs(got - ref).max() < 0.05


def test_old_schema_fixture_dynamic_and_int4_quantize_too() -> None:
    source = old_schema(FIXTURE.read_bytes())
    for recipe in (TfliteQuantRecipe("dynamic", 8), TfliteQuantRecipe("weight_only", 4)):
        built = _build(recipe, source)
        assert inspect_tflite(built.model).int_weights > 0, recipe.name


def test_signature_less_model_is_calibrated_through_its_own_inputs() -> None:
    """Was: 'static calibration needs exactly one model signature, the model has 0'."""
    source = without_signatures(FIXTURE.read_bytes())
    assert inspect_tflite(source).signatures == ()
    built = _build(TfliteQuantRecipe("static", 8), source)
    assert any("no signature" in n for n in built.notes)
    images, labels = quadrant_images(64, seed=9)
    ref = _outputs(FIXTURE.read_bytes(), images)
    got = _outputs(built.model, images)
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95
    assert np.mean(got.argmax(1) == labels) >= 0.9


def test_static_int8_of_an_old_schema_signature_less_cnn_has_symmetric_weights_and_loads() -> None:
    """Was: conv kernels quantized as ADD activations, refused with
    ``affine_quantization->zero_point->data[i] != 0`` when loaded."""
    source = depthwise_cnn()
    built = _build(TfliteQuantRecipe("static", 8), source, calibration=32)
    assert asymmetric_conv_weights(built.model) == []
    assert _conv_weight_types(built.model)["DEPTHWISE_CONV_2D"] == "INT8"
    images = _images(16, seed=4)["image"]
    ref, got = _outputs(source, images), _outputs(built.model, images)
    assert np.abs(got - ref).max() < 0.1


def test_asymmetric_conv_weights_are_found() -> None:
    """The check that guards the rule above sees a non-zero weight zero point."""
    built = _build(TfliteQuantRecipe("dynamic", 8), depthwise_cnn())
    assert asymmetric_conv_weights(built.model) == []
    model = _read(built.model)
    graph = model.subgraphs[0]
    conv = next(
        o for o in graph.operators if len(o.inputs) > 1 and graph.tensors[o.inputs[1]].quantization
    )
    weight = graph.tensors[conv.inputs[1]]
    weight.quantization.zeroPoint = np.ones(len(weight.quantization.zeroPoint), np.int64)
    assert asymmetric_conv_weights(_write(model)) == [weight.name.decode()]


def test_fp16_weight_source_is_recognised_reported_and_quantized_from_dequantized_weights() -> None:
    """Was: reported as 'fp32 / source model as given', every quantized candidate failed."""
    source, count = with_fp16_weights(FIXTURE.read_bytes())
    assert count >= 2
    facts = inspect_tflite(source)
    assert facts.fp16_weights == count
    normalized = normalize_tflite(source)
    assert normalized.fp16_weights == count
    assert inspect_tflite(normalized.data).op_counts.get("DEQUANTIZE", 0) == 0
    assert any("fp16 weights" in n for n in normalized.notes())
    built = _build(TfliteQuantRecipe("weight_only", 8), source)
    assert set(_conv_weight_types(built.model).values()) == {"INT8"}
    assert any("fp16 weights" in n for n in built.notes)
    images = _images(32, seed=6)["image"]
    ref, got = _outputs(source, images), _outputs(built.model, images)
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95


def test_fp16_source_compiles_end_to_end_and_the_report_says_fp16() -> None:
    source, _ = with_fp16_weights(old_schema(FIXTURE.read_bytes()))
    source = without_signatures(source)
    name = _input_name(source)
    result = compile_model(
        source, LITERT, calibration=_images(16, 1, name), validation=_images(64, 2, name), **FAST
    )
    report = result.report
    fp32 = report.candidate("fp32")
    assert any("fp16 weights" in n for n in fp32.notes)
    built = [c for c in report.candidates if c.name != "fp32" and c.status != "failed"]
    assert {c.name for c in built} >= {"int8-weight-only", "int8-static", "int8-dynamic"}, [
        (c.name, c.reason) for c in report.candidates
    ]


def test_a_model_needing_no_rewrite_comes_back_byte_identical() -> None:
    data = FIXTURE.read_bytes()
    normalized = normalize_tflite(data)
    assert normalized.data == data
    assert normalized.notes() == []


def test_source_recipe_ships_the_source_unchanged() -> None:
    source, _ = with_fp16_weights(FIXTURE.read_bytes())
    recipe = tflite_recipes(LITERT)[0]
    built = recipe.build(BuildInput(source=load_source(source), prepared=None))
    assert built.model == source
