"""What a server checks before an adapter version reaches its engine, on real PEFT files (no
engine): every file read once and checksummed, the config's scaling bounded, and the bytes that
were checked are the bytes that get loaded."""

from __future__ import annotations

import json

import pytest

from shared.registry import CONFIG, WEIGHTS, Registry, base_fingerprint, verify_adapter
from tests.synthetic import publish_random


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model):
    registry = Registry(tmp_path_factory.mktemp("store"))
    publish_random(registry, tiny_model, seed=1)
    return registry, base_fingerprint(tiny_model)


def _copy(registry: Registry, tmp_path, change) -> object:
    import shutil

    target = tmp_path / "v1"
    shutil.copytree(registry.path(1), target)
    change(target)
    return target


def test_a_sound_version_passes_and_materializes_the_checked_bytes(store, tmp_path):
    registry, fingerprint = store
    verified = verify_adapter(registry.path(1), fingerprint, max_rank=16)
    assert verified.problems == []
    original = (registry.path(1) / WEIGHTS).read_bytes()
    assert verified.files[WEIGHTS] == original and CONFIG in verified.files
    # The store changes after the check: the engine still gets what was checked.
    copy = _copy(registry, tmp_path, lambda d: None)
    checked = verify_adapter(copy, fingerprint, 16)
    (copy / WEIGHTS).write_bytes(b"swapped after the check")
    loaded = checked.materialize(tmp_path / "private")
    assert (loaded / WEIGHTS).read_bytes() == original


@pytest.mark.parametrize(
    "change, problem",
    [
        # lora_alpha = 1e9 in place: the config is covered by the manifest's checksums.
        (
            lambda d: (d / CONFIG).write_text(
                json.dumps({**json.loads((d / CONFIG).read_text()), "lora_alpha": 1e9})
            ),
            "adapter_config.json sha256 does not match",
        ),
        (lambda d: (d / WEIGHTS).unlink(), "adapter_model.safetensors is missing"),
        (lambda d: (d / "manifest.json").write_text("{"), "cannot read the manifest"),
    ],
)
def test_tampered_or_incomplete_versions_are_refused(store, tmp_path, change, problem):
    registry, fingerprint = store
    verified = verify_adapter(_copy(registry, tmp_path, change), fingerprint, 16)
    assert any(problem in p for p in verified.problems), verified.problems
    assert verified.files == {}  # nothing to load


def test_an_extreme_scaling_is_refused_even_when_the_checksums_agree(store, tmp_path):
    registry, fingerprint = store

    def honest_but_huge(d):
        import hashlib

        config = {**json.loads((d / CONFIG).read_text()), "lora_alpha": 1e9}
        (d / CONFIG).write_text(json.dumps(config))
        manifest = json.loads((d / "manifest.json").read_text())
        manifest["files_sha256"][CONFIG] = hashlib.sha256((d / CONFIG).read_bytes()).hexdigest()
        (d / "manifest.json").write_text(json.dumps(manifest))

    verified = verify_adapter(_copy(registry, tmp_path, honest_but_huge), fingerprint, 16)
    assert any("lora_alpha/r = 1e+09/8" in p for p in verified.problems), verified.problems
