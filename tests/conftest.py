"""Shared test set-up: tests never read or write the repository's committed training snapshots."""

import pytest


@pytest.fixture(autouse=True)
def _private_snapshot_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setattr("models.train.SNAPSHOT_DIR", tmp_path_factory.mktemp("snapshots"))
