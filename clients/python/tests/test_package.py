"""rabbitgate-client is a package of its own: installable by itself into a fresh
virtual environment, depending on websockets alone, importable without the
gateway (no gateway, orjson, aio-pika, scikit-learn ...), and typed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
SERVER_ONLY = ["gateway", "anomaly", "orjson", "aio_pika", "aiormq", "sklearn", "aiohttp",
               "redis", "yaml", "jwt", "prometheus_client", "uvloop", "numpy"]  # fmt: skip


def test_its_only_dependency_is_websockets() -> None:
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "rabbitgate-client"
    assert [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]] == [
        "websockets"
    ]


def test_it_is_typed() -> None:
    assert (PACKAGE / "src" / "rabbitgate_client" / "py.typed").is_file()


def test_it_installs_into_a_fresh_venv_and_imports_without_the_gateway(tmp_path: Path) -> None:
    """pip installs it (and websockets, from the index) into an empty venv; the import
    then pulls in none of the server's packages."""
    source = tmp_path / "rabbitgate-client"  # a copy: the build writes next to its sources
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    shutil.copytree(PACKAGE, source, ignore=skip)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    probe = (
        "import sys, rabbitgate_client, importlib.metadata as m\n"
        "print([r for r in m.requires('rabbitgate-client') or [] if 'extra ==' not in r])\n"
        f"print([n for n in {SERVER_ONLY!r} if n in sys.modules])\n"
        "print(rabbitgate_client.RabbitgateClient.__module__)\n"
    )
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    requires, loaded, module = run.stdout.splitlines()
    assert requires.startswith("['websockets") and requires.count("'") == 2, requires
    assert loaded == "[]"
    assert module == "rabbitgate_client.client"
    freeze = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True
    )
    names = {line.split("==")[0].split(" @ ")[0].lower() for line in freeze.stdout.splitlines()}
    assert names == {"rabbitgate-client", "websockets"}, names


def test_the_import_in_this_interpreter_does_not_pull_in_the_gateway() -> None:
    probe = (
        f"import sys, rabbitgate_client; print([n for n in {SERVER_ONLY!r} if n in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
