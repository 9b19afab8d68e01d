"""Fixtures shared by the router's tests (tests/router and tests/router/openai)."""

import pytest
from transformers import AutoTokenizer


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    """The tiny test model's tokenizer (byte-level BPE with a ChatML template)."""
    return AutoTokenizer.from_pretrained(model_dir("llama", "tiny"))
