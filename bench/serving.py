"""Serving overhead: the agent's HTTP endpoint against a bare ``session.run`` (issue 11.4).

Two ONNX models built here with ``onnx.helper`` (nothing is downloaded):

- ``conv``: magika-sized - a 2048-element int32 vector (token ids) through
  three 1-D convolutions, a mean and a dense layer, about 3 MB of weights;
- ``mlp``: a tiny MLP (16 -> 32 -> 4 floats), where the model run is ~10 us
  and everything else is overhead.

For each model, in the same run:

1. **bare**: ``session.run`` on the very session the server uses (the
   agent's backend, 1 intra-op thread), in this process;
2. **HTTP**: the agent's real :class:`InferenceServer` in a *separate*
   process (as on a gateway: the client is another program), one request at
   a time on one keep-alive connection (``http.client``), for the v1 JSON API,
   OIP v2 JSON tensors and OIP v2 binary tensors; v1 with a new
   connection per request (what every client paid before keep-alive); and
   v1 from a raw client that keeps Nagle on and writes headers and body
   separately (http.client turns Nagle off; curl and C clients may not);
3. **throughput**: 4 client processes, each on its own keep-alive
   connection with v2 binary tensors, against 4 threads calling
   ``session.run`` in this process.

Reported: p50 per request (client-side, including the client's own HTTP
work), the ratio HTTP p50 / bare p50, the added milliseconds, and the
throughput ratio. Ratios are measured against a baseline of the same run, so
they carry over between machines better than the absolute numbers.

Measurements are interleaved in ``--rounds`` rounds (a new connection per
round), so a load change on a shared machine weighs on every mode alike.

Run: ``nice -n 10 python bench/serving.py`` (``--requests`` per measurement,
``--seconds`` per throughput run).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from edgefleet.shared.runtime import OnnxRuntimeBackend  # noqa: E402

HEADER = "Inference-Header-Content-Length"


# ----------------------------------------------------------------------------- models
def conv_model() -> bytes:
    """A magika-sized classifier: int32[1, 2048] -> float[1, 100], ~3 MB of weights."""
    rng = np.random.default_rng(11)

    def weight(name: str, *shape: int) -> Any:
        fan_in = int(np.prod(shape[1:]))
        array = rng.normal(0, (2.0 / fan_in) ** 0.5, shape).astype(np.float32)
        return numpy_helper.from_array(array, name)

    inits = [
        weight("c1", 64, 1, 8),
        weight("c2", 256, 64, 8),
        weight("c3", 320, 256, 8),
        weight("d", 320, 100),
        numpy_helper.from_array(np.array([1, 1, 2048], np.int64), "shape"),
        numpy_helper.from_array(np.array([2], np.int64), "axes"),
        numpy_helper.from_array(np.float32(1 / 256), "scale"),
    ]
    nodes = [
        helper.make_node("Cast", ["bytes"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["fs"]),
        helper.make_node("Reshape", ["fs", "shape"], ["x"]),
        helper.make_node("Conv", ["x", "c1"], ["h1"], strides=[4]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2"], ["h2"], strides=[4]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Conv", ["r2", "c3"], ["h3"], strides=[2]),
        helper.make_node("Relu", ["h3"], ["r3"]),
        helper.make_node("ReduceMean", ["r3", "axes"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "d"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("bytes", TensorProto.INT32, [1, 2048])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 100])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def mlp_model() -> bytes:
    """A tiny MLP: float[N, 16] -> float[N, 4]."""
    rng = np.random.default_rng(12)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [
            numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1"),
            numpy_helper.from_array(rng.normal(size=(32, 4)).astype(np.float32), "w2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def sample(name: str) -> tuple[str, np.ndarray]:
    if name == "conv":
        return "bytes", np.random.default_rng(1).integers(0, 256, (1, 2048), dtype=np.int32)
    return "x", np.random.default_rng(1).normal(size=(1, 16)).astype(np.float32)


# ----------------------------------------------------------------------------- server
def serve(model_path: Path) -> None:
    """The server process: the agent's endpoint on a free port until stdin closes."""
    from edgefleet.agent.metrics import ServingMetrics
    from edgefleet.agent.serving import InferenceServer, ModelHolder
    from edgefleet.protocols.messages import ModelRef

    holder = ModelHolder()
    holder.swap(
        OnnxRuntimeBackend().load(model_path),
        ModelRef(name="bench", version="1.0.0", release=1, target="bench.tar"),
    )
    server = InferenceServer(holder, ServingMetrics(), max_body_bytes=64 * 1024 * 1024)
    server.start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop()


# ----------------------------------------------------------------------------- requests
def bodies(name: str) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """Per protocol: (path, body, headers) for one inference of the sample."""
    input_name, array = sample(name)
    datatype = {"int32": "INT32", "float32": "FP32"}[array.dtype.name]
    v1 = json.dumps({"inputs": {input_name: array.tolist()}}).encode()
    v2_json = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "data": array.ravel().tolist(),
                }
            ]
        }
    ).encode()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": array.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    json_headers = {"Content-Type": "application/json"}
    return {
        "v1 JSON": ("/v1/infer", v1, json_headers),
        "v2 JSON": ("/v2/models/bench/infer", v2_json, json_headers),
        "v2 binary": (
            "/v2/models/bench/infer",
            header + array.tobytes(),
            {HEADER: str(len(header)), "Content-Type": "application/octet-stream"},
        ),
    }


def timed_requests(
    port: int, path: str, body: bytes, headers: dict[str, str], n: int, *, reconnect: bool
) -> list[float]:
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(n):
            if reconnect:
                conn.close()
            began = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            out.append(time.perf_counter() - began)
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}")
    finally:
        conn.close()
    return out


def split_write_requests(
    port: int, path: str, body: bytes, headers: dict[str, str], n: int
) -> list[float]:
    """A client that keeps Nagle on and writes headers and body separately (as C
    clients and curl can): on a kept-alive connection its body waits for the
    server's ACK of the headers, 40 ms when that ACK is delayed."""
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reader = sock.makefile("rb")
        for _ in range(n):
            began = time.perf_counter()
            sock.sendall(head.encode())
            sock.sendall(body)
            status = reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            reader.read(length)
            out.append(time.perf_counter() - began)
            if b" 200 " not in status:
                raise RuntimeError(f"{path}: {status!r}")
    return out


def _client_worker(args: tuple[int, str, bytes, dict[str, str], float]) -> int:
    port, path, body, headers, seconds = args
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        done += 1
    conn.close()
    return done


def p50(values: list[float]) -> float:
    return float(np.percentile(values, 50))


# ----------------------------------------------------------------------------- main
def bench_model(
    name: str, model: bytes, requests: int, rounds: int, seconds: float, tmp: Path
) -> dict[str, Any]:
    path = tmp / f"{name}.onnx"
    path.write_bytes(model)
    loaded = OnnxRuntimeBackend().load(path)
    session = loaded._session  # type: ignore[attr-defined]  # the session the server runs
    input_name, array = sample(name)
    feeds = {input_name: array}
    for _ in range(50):
        session.run(None, feeds)

    def bare_batch(n: int) -> list[float]:
        out = []
        for _ in range(n):
            began = time.perf_counter()
            session.run(None, feeds)
            out.append(time.perf_counter() - began)
        return out

    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        cases = bodies(name)
        for url, body, headers in cases.values():  # warm up
            timed_requests(port, url, body, headers, 50, reconnect=False)
        # Interleaved rounds, a new connection for each: on a shared machine
        # the load changes during a run, and a kept-alive connection's thread
        # may land on a busy core; both then weigh on every mode alike.
        per_round = max(1, requests // rounds)
        samples: dict[str, list[list[float]]] = {"bare": []}
        for _ in range(rounds):
            samples["bare"].append(bare_batch(per_round))
            for label, (url, body, headers) in cases.items():
                samples.setdefault(label, []).append(
                    timed_requests(port, url, body, headers, per_round, reconnect=False)
                )
            url, body, headers = cases["v1 JSON"]
            samples.setdefault("v1 JSON, new connection each", []).append(
                timed_requests(port, url, body, headers, per_round, reconnect=True)
            )
            samples.setdefault("v1 JSON, Nagle client, 2 writes", []).append(
                split_write_requests(port, url, body, headers, per_round)
            )

        def summary(rounds_: list[list[float]]) -> tuple[float, float]:
            """(p50 over all, lowest p50 of a round) in ms: the latter is the floor
            a quiet machine would show, the former what this run saw."""
            flat = [t for r in rounds_ for t in r]
            return p50(flat) * 1000, min(p50(r) for r in rounds_) * 1000

        bare_all, bare_best = summary(samples.pop("bare"))
        result: dict[str, Any] = {
            "model_bytes": len(model),
            "bare_p50_ms": bare_all,
            "bare_best_round_p50_ms": bare_best,
            "http": {label: summary(times) for label, times in samples.items()},
        }
        url, body, headers = cases["v2 binary"]
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(4) as pool:
            counts = pool.map(_client_worker, [(port, url, body, headers, seconds)] * 4)
        result["http_4_clients_per_s"] = sum(counts) / seconds
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)

    runs = [0] * 4
    stop = threading.Event()

    def run(i: int) -> None:
        while not stop.is_set():
            session.run(None, feeds)
            runs[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    result["bare_4_threads_per_s"] = sum(runs) / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("conv", conv_model()), ("mlp", mlp_model())):
            results[name] = bench_model(
                name, model, args.requests, args.rounds, args.seconds, Path(tmp)
            )
    if args.json:
        print(json.dumps(results, indent=2))
        return
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"cpus: {os.cpu_count()}, load average {load}; {args.requests} requests per p50")
    for name, r in results.items():
        bare, floor = r["bare_p50_ms"], r["bare_best_round_p50_ms"]
        print(
            f"\n{name} ({r['model_bytes'] / 1e6:.1f} MB): bare session.run p50 {bare:.3f} ms "
            f"(best round {floor:.3f})"
        )
        print(f"  {'':32s} {'p50 all rounds':>30s}   {'best round p50':>30s}")
        for label, (ms, best) in r["http"].items():
            print(
                f"  {label:32s} {ms:7.3f} ms {ms / bare:6.2f}x +{ms - bare:6.3f} ms   "
                f"{best:7.3f} ms {best / floor:6.2f}x +{best - floor:6.3f} ms"
            )
        ratio = r["http_4_clients_per_s"] / r["bare_4_threads_per_s"]
        print(
            f"  4 clients (v2 binary) {r['http_4_clients_per_s']:.0f}/s vs 4 threads "
            f"session.run {r['bare_4_threads_per_s']:.0f}/s: {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
