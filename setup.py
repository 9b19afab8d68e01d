"""Build hooks: map the top-level folders under `tgi_server` and generate the gRPC stubs.

The stubs are generated from proto/generate.proto by grpcio-tools on every build
(regular or editable) and never committed. protoc sees the file under the virtual
path `tgi_server/proto/`, so the generated `_pb2_grpc` module imports its `_pb2`
sibling by its full package name and nothing needs rewriting afterwards.
"""

import shutil
import tempfile
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()
FOLDERS = {"proto": "proto", "router": "router", "shard": "shard", "launcher": "launcher"}


def generate_stubs() -> None:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as out:
        args = [
            "grpc_tools.protoc",
            f"--proto_path=tgi_server/proto={ROOT / 'proto'}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            "tgi_server/proto/generate.proto",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on proto/generate.proto")
        for stub in (Path(out) / "tgi_server" / "proto").iterdir():
            shutil.copy(stub, ROOT / "proto" / stub.name)


class GenerateProto(Command):
    description = "generate the gRPC stubs from proto/"
    user_options: list = []

    def initialize_options(self) -> None: ...

    def finalize_options(self) -> None: ...

    def run(self) -> None:
        generate_stubs()


class BuildPy(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


def packages() -> tuple[list[str], dict[str, str]]:
    names, dirs = [], {}
    for name, folder in FOLDERS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            names.append(".".join(("tgi_server", name, *rel)))
        dirs[f"tgi_server.{name}"] = folder
    return names, dirs


names, dirs = packages()
setup(
    packages=names,
    package_dir=dirs,
    package_data={"tgi_server.proto": ["*.proto", "*.pyi"],
                  "tgi_server.shard.layers": ["*.cpp", "*.h"]},  # the kernels build at start-up
    cmdclass={"build_py": BuildPy, "proto": GenerateProto},
)
