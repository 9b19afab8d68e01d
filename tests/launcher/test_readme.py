"""The README cannot drift from the CLI, the Makefile, CI and the Docker image."""

import re
from pathlib import Path

from tgi_server.launcher.flags_doc import END, START, flag_table, replace_table

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_flag_table_matches_the_cli():
    assert replace_table(README) == README, (
        "README flag table is stale: run `python -m tgi_server.launcher.flags_doc README.md`")
    assert f"{START}\n{flag_table()}\n{END}" in README


def test_every_flag_of_the_brief_is_documented():
    for flag in ("--model-id", "--num-shard", "--max-input-length", "--cuda-memory-fraction",
                 "--graceful-termination-timeout", "--json-output", "--master-port"):
        assert f"`{flag}`" in flag_table()


def test_the_two_fresh_machine_commands_are_make_targets():
    blocks = bash_blocks(README)
    assert blocks[:2] == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_ci_runs_exactly_the_readme_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    assert "set -euo pipefail" in script
    commands = [line for line in script.splitlines()
                if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == [bash_blocks(README)[1]]


def test_docker_image_is_cpu_torch_and_the_launcher():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in dockerfile
    assert 'ENTRYPOINT ["tgi-launch"]' in dockerfile and "EXPOSE 3000" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"models/", ".cache/", ".git"} <= set(ignored)
