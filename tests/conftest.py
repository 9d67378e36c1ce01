"""Shared fixtures: tiny in-process models (no downloads), prompts, and the `gpu` marker skip."""

from __future__ import annotations

import pytest
import torch

from medusa_engine.hf_adapter import HFModel

# Story openings in the style of TinyStories (stories260k's training data), written for the tests.
PROMPTS = [
    "Once upon a time",
    "One day, a little girl named Lily",
    "Tom had a red ball",
    "The sun was shining and",
    "There was a big dog who",
    "Sara and Ben went to the park",
    "A little bird sat on a tree",
    "Mom said, \"Let's bake a cake",
    "The cat was very hungry",
    "Once there was a small boat",
    "Max wanted to play with his friend",
    "In the garden, there were many flowers",
    "The little boy found a shiny rock",
    "Anna liked to draw pictures",
    "It was a rainy day, so",
    "The old man had a long beard",
    "Timmy saw a big truck",
    "A kind fairy lived in the forest",
    "The princess wanted a new dress",
    "Jack and Jill climbed the hill",
]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Test tensors are tiny: intra-op threads only add overhead (and contend on a busy 2-core
    machine, up to 30x slower). Benchmarks, not tests, measure multi-threaded speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def stories260k() -> HFModel:
    """The bundled 260K-parameter Llama (GQA: 8 query / 4 KV heads), fp32."""
    torch.manual_seed(0)
    return HFModel.load("stories260k", dtype="fp32")


def tiny_random_model(family: str) -> HFModel:
    """A tiny randomly initialised model of another family (fp32, eager-free SDPA)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config = {"qwen2": Qwen2Config, "mistral": MistralConfig}[family](**common)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="sdpa", dtype=torch.float32
    )
    return HFModel(model, name=f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_qwen2() -> HFModel:
    return tiny_random_model("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral() -> HFModel:
    return tiny_random_model("mistral")


@pytest.fixture(scope="session")
def prompt_ids(stories260k) -> list[list[int]]:
    return [stories260k.tokenizer(p)["input_ids"] for p in PROMPTS]
