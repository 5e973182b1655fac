"""Compile cost and weight-only latency, measured on this machine.

Two modes:

``latency``
    Builds the int8 weight-only variant of generated Conv and MLP models and
    times fp32, the variant opened as the agent opens it (the
    ``session.disable_quant_qdq`` entry its metadata asks for), and the same
    variant with onnxruntime's default options, in interleaved rounds. The
    ratios are against fp32 in the same run.

``cost``
    Compiles each model for ``x86-avx2`` (every applicable recipe, 128
    calibration samples, 200 validation samples) in a child process and
    records wall time, CPU time (user+sys: less sensitive to a shared machine's
    load than wall time) and the child's peak RSS. Models: generated Conv nets and
    MLPs of 1-9 MB, and with ``--model PATH --data magika`` a real model (the
    magika content-type classifier; its input is built from files on disk).

How the compile keeps its cost proportional to the model (see pipeline.py):
candidates are built one after another from one pre-processed model;
static int8 calibrates once per method (onnxruntime's calibration cache) in
strides of <= 8 samples, so calibration memory is bounded by the stride and
not the sample count; weight-only and int4 recipes need no calibration; the
latency rounds are cut to a 12 s budget (at least 10 rounds).

Run from the repository root::

    python bench/compile_cost.py latency
    python bench/compile_cost.py cost
    python bench/compile_cost.py cost --data magika \
        --model ~/.cache/edgefleet-bench/models/magika-1.0.3/magika/models/standard_v3_3/model.onnx

This is a script, not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

F = np.float32
Arr = npt.NDArray[Any]


def conv_net(channels: int, blocks: int, seed: int = 0) -> bytes:
    """Conv(3x3)+BatchNorm+Relu blocks on 32x32 images, GAP, Gemm head."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x, cin = "x", 3
    for i in range(blocks):
        c = channels
        w = rng.normal(0, np.sqrt(2 / (9 * cin)), (c, cin, 3, 3)).astype(F)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        for part, val in (
            ("s", rng.uniform(0.5, 1.5, c)),
            ("b", rng.normal(0, 0.1, c)),
            ("m", rng.normal(0, 0.1, c)),
            ("v", rng.uniform(0.5, 1.5, c)),
        ):
            inits.append(numpy_helper.from_array(val.astype(F), f"bn{i}{part}"))
        nodes += [
            helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
            helper.make_node(
                "BatchNormalization",
                [f"c{i}", f"bn{i}s", f"bn{i}b", f"bn{i}m", f"bn{i}v"],
                [f"n{i}"],
            ),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        x, cin = f"r{i}", c
    inits += [
        numpy_helper.from_array(rng.normal(0, 0.1, (10, cin)).astype(F), "fw"),
        numpy_helper.from_array(np.zeros(10, F), "fb"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def mlp(width: int, layers: int, features: int = 256, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    dims = [features] + [width] * layers + [10]
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    x = "x"
    for i in range(len(dims) - 1):
        a, b = dims[i], dims[i + 1]
        inits += [
            numpy_helper.from_array(rng.normal(0, np.sqrt(2 / a), (a, b)).astype(F), f"w{i}"),
            numpy_helper.from_array(rng.normal(0, 0.05, b).astype(F), f"b{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
        ]
        x = f"a{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


GENERATED = {
    "conv-1.3MB": lambda: conv_net(64, 9),
    "conv-5.3MB": lambda: conv_net(128, 9),
    "mlp-2.4MB": lambda: mlp(384, 4),
    "mlp-9.2MB": lambda: mlp(768, 4),
}


def random_data(model: bytes, n: int, seed: int) -> dict[str, Arr]:
    proto = onnx.load_model_from_string(model)
    inp = proto.graph.input[0]
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim][1:]
    return {inp.name: np.random.default_rng(seed).normal(0, 1, (n, *shape)).astype(F)}


def magika_data(n: int, seed: int) -> dict[str, Arr]:
    """magika's features from real files on disk: first and last 1024 bytes, padded with 256."""
    files = sorted(
        p
        for root in ("/usr/share/doc", "/usr/lib/python3.11", "/usr/include", "/etc")
        for p in Path(root).rglob("*")
        if p.is_file() and not p.is_symlink()
    )
    rng = np.random.default_rng(seed)
    rng.shuffle(files)  # type: ignore[arg-type]
    rows: list[Arr] = []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        content = raw[:4096].lstrip()
        tail = raw[-4096:].rstrip()
        if len(content) < 8:
            continue
        beg = np.full(1024, 256, np.int32)
        end = np.full(1024, 256, np.int32)
        b = np.frombuffer(content[:1024], np.uint8)
        e = np.frombuffer(tail[-1024:], np.uint8)
        beg[: len(b)] = b
        end[1024 - len(e) :] = e
        rows.append(np.concatenate([beg, end]))
        if len(rows) == n:
            break
    return {"bytes": np.stack(rows)}


# --------------------------------------------------------------------------- latency
def latency_mode(rounds: int, extra: list[tuple[str, Path, str]]) -> list[list[str]]:
    import onnxruntime as ort

    from edgefleet.controller.compiler.pipeline import load_source
    from edgefleet.controller.compiler.recipe_base import BuildInput
    from edgefleet.controller.compiler.recipes import (
        WeightOnlyInt8Recipe,
        prepare_for_quantization,
    )

    def session(model: bytes, fold: bool) -> Any:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        if fold:
            so.add_session_config_entry("session.disable_quant_qdq", "1")
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

    rows = []
    jobs = [(name, build, "random") for name, build in GENERATED.items()]
    jobs += [(name, path.read_bytes, data) for name, path, data in extra]
    for name, build, data in jobs:
        model = build()
        src = load_source(model)
        wo = WeightOnlyInt8Recipe().build(BuildInput(src, prepare_for_quantization(src))).model
        sample = magika_data(1, 0) if data == "magika" else random_data(model, 1, 0)
        feed = {k: v[:1] for k, v in sample.items()}
        sessions = {
            "fp32": session(model, False),
            "wo8 folded": session(wo, True),
            "wo8 default": session(wo, False),
        }
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            for _ in range(3):
                s.run(None, feed)
        for r in range(rounds):
            order = list(sessions)[r % 3 :] + list(sessions)[: r % 3]
            for k in order:
                t = time.perf_counter()
                sessions[k].run(None, feed)
                times[k].append(time.perf_counter() - t)
        p50 = {k: float(np.median(v)) for k, v in times.items()}
        rows.append(
            [
                name,
                f"{len(model) / 1e6:.2f} MB",
                f"{len(model) / len(wo):.2f}x",
                f"{p50['fp32'] * 1e3:.2f} ms",
                f"{p50['wo8 folded'] / p50['fp32']:.2f}x",
                f"{p50['wo8 default'] / p50['fp32']:.2f}x",
            ]
        )
        print(" | ".join(rows[-1]), flush=True)
    return rows


# --------------------------------------------------------------------------- cost
def compile_one(model_path: Path, data: str) -> dict[str, Any]:
    """Runs in the child: compile and report wall, peak RSS and the choice per objective."""
    import dataclasses

    from edgefleet.controller.compiler import BUILTIN_PROFILES, compile_model

    model = model_path.read_bytes()
    if data == "magika":
        cal, val = magika_data(128, 1), magika_data(200, 2)
    else:
        cal, val = random_data(model, 128, 1), random_data(model, 200, 2)
    prof = BUILTIN_PROFILES["x86-avx2"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = before.ru_utime + before.ru_stime
    t = time.time()
    result = compile_model(model, prof, calibration=cal, validation=val)
    wall = time.time() - t
    rep = result.report
    sized = dataclasses.replace(prof, name="x86-avx2-size", objective="size")
    from edgefleet.controller.compiler.pipeline import apply_objective
    from edgefleet.controller.compiler.report import select

    capped, _ = apply_objective(
        [
            dataclasses.replace(c, status="measured", rank=None, reason=None)
            if c.status in ("chosen", "eligible", "rejected") and c.latency_ratio is not None
            else c
            for c in rep.candidates
        ],
        sized,
    )
    by_size = [c for c in select(capped, sized, tolerance=rep.tolerance) if c.rank == 1]
    best = rep.best
    size_best = by_size[0] if by_size else None

    def describe(c: Any) -> str:
        if c is None:
            return "-"
        return f"{c.name} ({1 / c.size_ratio:.2f}x smaller, {c.latency_ratio:.2f}x latency)"

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime - cpu_before,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "latency": describe(best),
        "size": describe(size_best),
        "candidates": len(rep.candidates),
    }


def cost_mode(extra: list[tuple[str, Path, str]]) -> list[list[str]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs: list[tuple[str, Path, str]] = []
        for name, build in GENERATED.items():
            path = Path(tmp) / f"{name}.onnx"
            path.write_bytes(build())
            jobs.append((name, path, "random"))
        for job in [*jobs, *extra]:
            name, path, data = job
            out = subprocess.run(
                [sys.executable, __file__, "_one", str(path), data],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                rows.append([name, f"{path.stat().st_size / 1e6:.2f} MB", "failed", "", "", "", ""])
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                [
                    name,
                    f"{path.stat().st_size / 1e6:.2f} MB",
                    f"{r['wall_s']:.1f} s",
                    f"{r['cpu_s']:.1f} s",
                    f"{r['peak_rss_mb']:.0f} MB",
                    r["latency"],
                    r["size"],
                ]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "_one":
        print(json.dumps(compile_one(Path(sys.argv[2]), sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["latency", "cost"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--model", type=Path, action="append", default=[])
    ap.add_argument("--data", action="append", default=[], help="random or magika, per --model")
    args = ap.parse_args()
    extra = [
        (p.stem if p.stem != "model" else p.parent.name, p, d)
        for p, d in zip(args.model, args.data or ["random"] * len(args.model), strict=True)
    ]
    if args.mode == "latency":
        print("model | size | wo8 size ratio | fp32 p50 | wo8 folded / fp32 | wo8 default / fp32")
        latency_mode(args.rounds, extra)
    else:
        print("model | size | wall | CPU | peak RSS | latency objective | size objective")
        cost_mode(extra)


if __name__ == "__main__":
    main()
