"""`--dtype auto`: bfloat16 on CUDA and on CPUs that multiply it natively, float32 otherwise."""

import pytest
import torch

from tgi_server.shard import cli

CPU = torch.device("cpu")


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, torch.float32)])
def test_auto_follows_the_cpus_bfloat16_units(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert cli.resolve_dtype("auto", CPU) == expected
    assert cli.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_explicit_dtypes_are_kept_and_unknown_ones_refused():
    assert cli.resolve_dtype("float32", CPU) == torch.float32
    assert cli.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="unsupported --dtype 'float8'"):
        cli.resolve_dtype("float8", CPU)
