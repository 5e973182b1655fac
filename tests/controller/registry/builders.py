"""Builders of registry inputs shared by the registry's test modules.

Plain functions, not fixtures: each test says exactly what it registers.
"""

from __future__ import annotations

from edgefleet.controller.registry import BundleInfo, ModelVersionInfo, Registry
from edgefleet.protocols.bundle import TensorSpec
from edgefleet.protocols.messages import (
    AgentState,
    ErrorInfo,
    HardwareInfo,
    LatencySummary,
    ModelRef,
    ReportedState,
    Telemetry,
)

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "SHA",
    "make_bundle",
    "make_report",
    "make_telemetry",
    "make_version",
]

SHA = "ab" * 32
INPUTS = (TensorSpec("x", "float32", (None, 4)),)
OUTPUTS = (TensorSpec("y", "float32", (None, 2)),)


def make_version(reg: Registry, name: str = "clf", version: str = "1.0") -> ModelVersionInfo:
    return reg.register_model_version(
        name, version, source_sha256=SHA, inputs=INPUTS, outputs=OUTPUTS
    )


def make_bundle(
    reg: Registry, mv: ModelVersionInfo, hardware_class: str, runtime: str = "onnxruntime"
) -> BundleInfo:
    return reg.add_bundle(
        mv.id,
        hardware_class=hardware_class,
        runtime=runtime,
        precision="int8",
        target_path=f"{mv.name}/{mv.version}/{hardware_class}-{runtime}.tar",
        sha256=SHA,
        length=1234,
    )


def make_report(
    device_id: str,
    *,
    state: AgentState = AgentState.IDLE,
    active: ModelRef | None = None,
    error: ErrorInfo | None = None,
    hardware_class: str = "generic",
) -> ReportedState:
    return ReportedState(
        device_id=device_id,
        state=state,
        active=active,
        hardware=HardwareInfo(
            arch="aarch64",
            cpu_features=("neon",),
            runtimes=("onnxruntime",),
            hardware_class=hardware_class,
        ),
        last_error=error,
        extra={"future_field": 7},
    )


def make_telemetry(
    device_id: str, requests: int, *, p50: float | None, errors: int = 0, version: str = "1.0"
) -> Telemetry:
    return Telemetry(
        device_id=device_id,
        window_s=10.0,
        requests=requests,
        errors=errors,
        latency_ms=None if p50 is None else LatencySummary(p50, p50 * 2, p50 * 3),
        model=ModelRef("clf", version, 1, "clf/t.tar"),
        rss_bytes=10_000_000,
        cpu_percent=12.5,
    )
