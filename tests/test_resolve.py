"""Naming a model by Hugging Face repo id resolves through the local HF cache (no network in tests)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import edgerun
from hf_models import build, save


def test_repo_id_from_the_local_cache(tmp_path, monkeypatch):
    hf = build("olmoe")
    src = save(hf, tmp_path / "src")
    # the layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/<commit>/files}
    repo = tmp_path / "hub" / "models--someorg--tiny-olmoe"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))

    model = edgerun.load("someorg/tiny-olmoe")
    assert model.path == repo / "snapshots" / commit
    ids = [1, 2, 3, 4]
    assert np.array_equal(model.logits(ids), edgerun.load(src).logits(ids))


def test_unknown_repo_id_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(edgerun.ModelNotFoundError, match="someorg/absent.*not in the Hugging Face cache"):
        edgerun.load("someorg/absent")


def test_a_file_is_not_a_model_directory(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(edgerun.ModelNotFoundError, match="is a file"):
        edgerun.load(f)
