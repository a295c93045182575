"""``load_bundle``: one pydantic-core pass from the bytes for good bundles, the same NACK reasons
as the step-by-step parse for bad ones, and the same bundle either way."""

from __future__ import annotations

import json

import pytest
from runtime_harness import mesh_bundle, service_bundle, simple_destination

from runtime.bundle import _ADAPTER, BundleError, bundle_bytes, bundle_digest, load_bundle


def _slow(data: bytes) -> object:
    """The reference: json.loads, the object and format checks, then validate_python."""
    raw = json.loads(data)
    assert isinstance(raw, dict) and raw.get("format") == 1
    return _ADAPTER.validate_python(raw)


def test_good_bundles_load_to_what_the_reference_parse_gives() -> None:
    for bundle in (
        mesh_bundle(destinations={"benigno": simple_destination("benigno")}),
        service_bundle("magnanimo"),
    ):
        data = bundle_bytes(bundle)
        loaded = load_bundle(data, bundle_digest(data))
        assert loaded == _slow(data) == bundle


def _doc(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = json.loads(bundle_bytes(mesh_bundle()))
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "bundle is not JSON: "),
        (b"\xff\xfe", "bundle is not JSON: "),
        (b"[1, 2]", "bundle is not a JSON object"),
        (b'"mesh"', "bundle is not a JSON object"),
        (json.dumps(_doc(format=2)).encode(), "unknown bundle format 2; this data plane knows 1"),
        (json.dumps(_doc(format="1")).encode(), "unknown bundle format '1'; this data plane knows 1"),
        (
            json.dumps({k: v for k, v in _doc().items() if k != "format"}).encode(),
            "unknown bundle format None; this data plane knows 1",
        ),
        (json.dumps(_doc(passthrough="maybe")).encode(), "bundle does not match the schema: "),
        (json.dumps(_doc(surprise=1)).encode(), "bundle does not match the schema: "),
        (json.dumps(_doc(type="other")).encode(), "bundle does not match the schema: "),
    ],
)
def test_bad_bundles_are_refused_with_the_same_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(BundleError) as err:
        load_bundle(data, bundle_digest(data))
    assert str(err.value).startswith(reason), str(err.value)


def test_digest_is_checked_before_parsing() -> None:
    with pytest.raises(BundleError, match="digest mismatch: body hashes to"):
        load_bundle(b"{not json", "0" * 64)
