"""shared/models.py: a model named by hub id is its Hugging Face cache snapshot, offline first."""

from __future__ import annotations

import pytest

from shared import models
from shared.config import ModelConfig
from shared.registry import base_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    models.local_model_dir.cache_clear()
    yield cache
    models.local_model_dir.cache_clear()


def cache_model(cache, repo_id: str, source) -> object:
    """The layout huggingface_hub writes: blobs behind snapshots/<commit>, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for file in source.iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_a_hub_id_is_its_cached_snapshot_offline_and_fingerprints_as_its_files(
    hub_cache, tiny_model
):
    snapshot = cache_model(hub_cache, "org/tiny", tiny_model)
    resolved = models.resolve_model_path(ModelConfig(path="org/tiny"))
    assert resolved == str(snapshot)
    assert base_fingerprint(resolved) == base_fingerprint(tiny_model)


def test_a_hub_id_missing_offline_names_the_cache_and_how_to_get_it(hub_cache):
    with pytest.raises(models.ModelNotFound) as refused:
        models.resolve_model_path(ModelConfig(path="org/absent"))
    message = str(refused.value)
    assert "org/absent" in message and str(hub_cache) in message and "hf download" in message


def test_a_missing_folder_is_not_taken_for_a_hub_id(hub_cache, tmp_path):
    for path in (str(tmp_path / "nope"), "./models/x", "a/b/c"):
        with pytest.raises(models.ModelNotFound, match="no such folder"):
            models.resolve_model_path(ModelConfig(path=path))


def test_a_local_folder_is_used_as_it_is(tiny_model):
    assert models.resolve_model_path(ModelConfig(path=str(tiny_model))) == str(tiny_model.resolve())
