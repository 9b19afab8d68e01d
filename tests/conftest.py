"""Shared fixtures: random-weight models built once and cached across sessions.

`model_dir(arch, size="tiny", **kw)` returns the directory of a model made by
`tgi-make-model` (kw: seed, rope_scaling, dtype). Models are cached under
`.cache/test-models/<key>` (gitignored), keyed by the options and `MAKER_VERSION`, so a rerun
loads them instantly; a build goes to a temporary sibling first and is renamed into place, so
an interrupted or concurrent build never leaves half a model behind.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tgi_server.launcher.make_model import MAKER_VERSION, make_model

CACHE_ROOT = Path(__file__).resolve().parents[1] / ".cache" / "test-models"


def _build_cached(arch: str, size: str = "tiny", **kw) -> Path:
    options = {"seed": 0, "rope_scaling": "none", "dtype": "float32", **kw}
    key = "-".join([arch, size, *(f"{k}={v}" for k, v in sorted(options.items()))])
    key += f"-v{MAKER_VERSION}"
    target = CACHE_ROOT / key
    if (target / "config.json").is_file():
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=CACHE_ROOT))
    try:
        make_model(tmp, arch, size, tokenizer_cache_dir=CACHE_ROOT / "tokenizers", **options)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a lost race with another builder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def model_dir() -> Callable[..., Path]:
    """Factory: `model_dir(arch, size="tiny", **kw) -> Path` of a cached tgi-make-model output."""
    return _build_cached
