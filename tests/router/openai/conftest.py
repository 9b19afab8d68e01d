"""Fixtures of the OpenAI API tests: the tiny tokenizer (ChatML template) and a served app."""

import sys
from pathlib import Path

import pytest

# NOTE: tests/router holds fake_shard.py; pytest puts only this folder on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from openai_app import serve  # noqa: E402


@pytest.fixture
async def router(tokenizer):
    async with serve(tokenizer) as router:
        yield router
