"""The catalog: release counters, concurrent registrations, duplicates and bundles."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from edgefleet.controller.errors import (
    DuplicateError,
    NotFoundError,
)
from edgefleet.controller.registry import Registry
from edgefleet.controller.registry import models as m
from edgefleet.controller.registry.catalog import reissue_bundle
from tests.controller.registry.builders import (
    INPUTS,
    OUTPUTS,
    SHA,
    make_bundle,
    make_version,
)


def test_release_counter_increases_per_model(registry: Registry) -> None:
    v1 = make_version(registry, "clf", "1.0")
    v2 = make_version(registry, "clf", "2.0")
    v15 = make_version(registry, "clf", "1.5")  # a lower version string still gets a higher release
    other = make_version(registry, "det", "1.0")
    assert (v1.release, v2.release, v15.release, other.release) == (1, 2, 3, 1)
    assert [v.version for v in registry.list_model_versions("clf")] == ["1.5", "2.0", "1.0"]
    assert len(registry.list_model_versions()) == 4
    got = registry.get_model_version("clf", "2.0")
    assert got == v2
    assert got.inputs == INPUTS
    assert got.outputs == OUTPUTS
    assert got.created_at.tzinfo is not None
    assert got.created_at.utcoffset() == timedelta(0)


def test_concurrent_registrations_get_distinct_releases(registry: Registry) -> None:
    errors: list[BaseException] = []

    def register(i: int) -> None:
        try:
            make_version(registry, "race", f"{i}.0")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    releases = sorted(v.release for v in registry.list_model_versions("race"))
    assert releases == list(range(1, 9))


def test_duplicates_are_refused(registry: Registry) -> None:
    mv = make_version(registry)
    with pytest.raises(DuplicateError, match=r"clf@1\.0"):
        make_version(registry)
    make_bundle(registry, mv, "generic")
    with pytest.raises(DuplicateError, match="target path"):
        make_bundle(registry, mv, "generic")
    registry.enroll_device("gw-1")
    with pytest.raises(DuplicateError, match="gw-1"):
        registry.enroll_device("gw-1")
    # A refused duplicate must not have consumed a release number.
    assert make_version(registry, "clf", "2.0").release == 2


def test_missing_things_raise_not_found(registry: Registry) -> None:
    with pytest.raises(NotFoundError):
        registry.get_model_version("nope", "1")
    with pytest.raises(NotFoundError):
        registry.add_bundle(
            999,
            hardware_class="generic",
            runtime="onnxruntime",
            precision="fp32",
            target_path="x.tar",
            sha256=SHA,
            length=1,
        )
    with pytest.raises(NotFoundError):
        registry.get_deployment("0" * 32)
    assert registry.get_device("nope") is None


def test_bundles_for_lists_report_json(registry: Registry) -> None:
    mv = make_version(registry)
    report = {"accuracy": {"top1": 0.91}, "steps": ["quantize", "check"]}
    registry.add_bundle(
        mv.id,
        hardware_class="rpi4",
        runtime="onnxruntime",
        precision="int8",
        target_path="clf/1.0/rpi4.tar",
        sha256=SHA,
        length=42,
        report=report,
    )
    make_bundle(registry, mv, "generic")
    bundles = registry.bundles_for(mv.id)
    assert [(b.hardware_class, b.report) for b in bundles] == [("rpi4", report), ("generic", None)]


def test_reissue_takes_a_new_release_and_is_reused(registry: Registry) -> None:
    v1 = make_version(registry, "clf", "1.0")
    original = make_bundle(registry, v1, "generic")
    make_version(registry, "clf", "2.0")  # release 2: the re-issue must go above it
    with registry.database.write() as s:
        row = s.get(m.Bundle, original.id)
        assert row is not None
        first = reissue_bundle(s, row, above=2, now=m.utcnow())
        assert first.created and first.source.id == original.id
        assert (first.bundle.release, first.bundle.reissue_of) == (3, original.id)
        assert first.bundle.target_path == "clf/1.0/reissue-3/generic-onnxruntime.tar"
        assert first.version.release == 1
        # Asked again for a release above 2: the same re-issue, nothing new.
        again = reissue_bundle(s, row, above=2, now=m.utcnow())
        assert (again.created, again.bundle.id) == (False, first.bundle.id)
        # A re-issue of the re-issue copies the original, with a newer release.
        newer = reissue_bundle(s, first.bundle, above=3, now=m.utcnow())
        assert newer.created and newer.source.id == original.id
        assert (newer.bundle.release, newer.bundle.reissue_of) == (4, original.id)
    # The counter moved for good: the next version is registered above the re-issues.
    assert make_version(registry, "clf", "3.0").release == 5
