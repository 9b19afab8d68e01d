"""What `pip install .` (the Docker image) ships: everything the shard builds at start-up, and
one top-level import name."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tgi_server.shard.layers import cpu_kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory) -> set[str]:
    """The files of a wheel built from the tracked files alone (a build/ left in the tree
    would add whatever an earlier build copied there)."""
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("wheel")
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], check=True,
                             capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(tree)],
                   check=True, capture_output=True)
    (wheel,) = out.glob("*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_the_cpu_kernels_and_the_headers_they_include_are_shipped(wheel_files):
    needed = set()
    for source in cpu_kernels.SOURCES:
        needed.add(source.name)
        needed.update(re.findall(r'^#include "([^"]+)"', source.read_text(), re.M))
    assert "simd.h" in needed  # what a wheel without headers lacked: no kernel could build
    missing = {name for name in needed if f"tgi_server/shard/layers/{name}" not in wheel_files}
    assert not missing


def test_the_wheel_claims_one_top_level_name(wheel_files):
    tops = {name.split("/")[0] for name in wheel_files if not name.split("/")[0].endswith(
        ".dist-info")}
    assert tops == {"tgi_server"}
