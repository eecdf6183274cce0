"""`train` on Ray workers: the training loop in one Ray task on the session's cluster, its
steps streamed back to the driver, the same checkpoint as a local run with the same seed.

The same run, not just a similar one: the task runs the same code on the same CPU with one
intra-op thread (Ray sets OMP_NUM_THREADS to the task's one CPU; the local run below is pinned
to one thread too), and the data order and views depend only on the seed. Not bit-identical:
in a long test session float reductions can differ in the last bits, and training amplifies
them: SimCLR losses stay within 1e-7 over 6 steps, so the first loss must be equal and the
rest close (1e-3); BYOL's momentum teacher moved some weights by up to 1e-2 in one session,
so for BYOL only the first loss and the checkpoint's layout are compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from ray.exceptions import RayError
from safetensors.torch import load_file

from pipeline.cli import main as cli
from pipeline.config import AugmentConfig, InputConfig, ModelConfig, RuntimeConfig, to_dict
from pipeline.errors import UserError
from pipeline.train import TrainConfig, TrainJobConfig, run_train

TINY_MODEL = ModelConfig(arch="small_cnn", projector_dims=[16], kwargs={"width": 8, "out_dim": 16})
STEPS = 6
REPO = Path(__file__).resolve().parents[1]


def train_config(output: Path, shards: list[str], method: str = "simclr") -> TrainJobConfig:
    return TrainJobConfig(
        output=str(output),
        input=InputConfig(shards=[str(s) for s in shards]),
        model=TINY_MODEL,
        augment=AugmentConfig(size=24),
        train=TrainConfig(method=method, steps=STEPS, batch_size=8, seed=3),
        shuffle_buffer=16,
        device="cpu",
    )


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local(digit_shards, tmp_path_factory) -> dict[str, Path]:
    """A local run per method: the reference the Ray runs must equal."""
    _, urls = digit_shards
    runs = {}
    for method in ("simclr", "byol"):
        out = tmp_path_factory.mktemp(f"local-{method}")
        with one_thread():
            run_train(train_config(out, urls, method))
        runs[method] = out
    return runs


def assert_same_run(mine: Path, reference: Path, close: bool = True) -> None:
    """`close=False` (BYOL): the same start and a checkpoint of the same layout only; its
    momentum teacher amplifies last-bit differences to up to 1e-2 in some weights in 6 steps."""
    ours, theirs = (load_file(str(d / "encoder.safetensors")) for d in (mine, reference))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape and torch.isfinite(ours[name]).all()
        if close:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-4)
    ours, theirs = (
        np.loadtxt(d / "loss.csv", delimiter=",", skiprows=1) for d in (mine, reference)
    )
    assert ours.shape == theirs.shape and ours.shape[0] == STEPS
    assert ours[0, 1] == theirs[0, 1]  # the first step's loss: the same init, data and views
    if close:
        np.testing.assert_allclose(ours, theirs, rtol=1e-3)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_ray_train_writes_the_local_checkpoint(
    method, local, digit_shards, ray_session, tmp_path, capsys
):
    _, urls = digit_shards
    config = train_config(tmp_path, urls, method)
    config.runtime = RuntimeConfig(address=ray_session.address)
    assert config.uses_ray()
    summary = run_train(config)
    assert_same_run(tmp_path, local[method], close=method == "simclr")
    assert summary["ran_on"].startswith("ray node ") and summary["device"] == "cpu"
    assert summary["examples_seen"] == STEPS * 8
    job = yaml.safe_load((tmp_path / "job.yaml").read_text())
    assert job["influence"]["model"]["checkpoint"] == str(tmp_path / "encoder.safetensors")
    # The steps came back while it ran: the driver's progress reached every step with the
    # last loss; stdout holds only the result line.
    out, err = capsys.readouterr()
    last = [line for line in err.splitlines() if line.startswith(f"train {method}: ")][-1]
    assert f"{STEPS}/{STEPS} steps, {STEPS * 8} examples" in last
    assert f"loss {summary['final_loss']:.4f}" in last
    assert out.startswith(f"train: {method}, {STEPS} steps") and "examples/s" not in out


def test_ray_flag_joins_the_session_cluster(local, digit_shards, ray_session, tmp_path):
    """`ray=true` alone: the connected cluster (here the session's), not a new embedded one."""
    _, urls = digit_shards
    code = cli(
        ["train", "--out", str(tmp_path), "--set", "ray=true", "--set", "progress=false"]
        + [part for s in cli_settings(urls) for part in ("--set", s)]
    )
    assert code == 0
    assert_same_run(tmp_path, local["simclr"])
    assert json.loads((tmp_path / "train.json").read_text())["ran_on"].startswith("ray node ")


def cli_settings(urls: list[str]) -> list[str]:
    return [
        f"input.shards={','.join(urls)}",
        "model.projector_dims=[16]",
        "model.kwargs={width: 8, out_dim: 16}",
        "augment.size=24",
        f"train.steps={STEPS}",
        "train.batch_size=8",
        "train.seed=3",
        "shuffle_buffer=16",
        "device=cpu",
    ]


def test_a_mistake_found_on_the_worker_is_one_line(digit_shards, ray_session, tmp_path):
    _, urls = digit_shards
    config = train_config(tmp_path, urls)
    config.model = ModelConfig(arch="no_such_net")
    config.ray = True
    with pytest.raises(UserError, match="no_such_net") as caught:
        run_train(config)
    assert "ray::" not in str(caught.value) and len(str(caught.value).splitlines()) <= 2
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        settings = ["ray=true", "model.arch=no_such_net", f"input.shards={urls[0]}"]
        code = cli(["train", "--out", str(tmp_path), *[f"--set={s}" for s in settings]])
    assert code == 2 and err.getvalue().startswith("error: ") and "Traceback" not in err.getvalue()
    assert not (tmp_path / "encoder.safetensors").exists()


def dies_once(marker: str, width: int, out_dim: int, in_channels: int = 1) -> torch.nn.Module:
    """An arch factory: small_cnn, but the first process to build it (no marker yet) exits
    at once, as a worker whose node is lost would."""
    from pipeline.models import build_backbone

    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)
    kwargs = {"width": width, "out_dim": out_dim}
    return build_backbone(ModelConfig(arch="small_cnn", in_channels=in_channels, kwargs=kwargs))


def test_a_lost_worker_is_run_again_and_trains_the_same(digit_shards, ray_session, tmp_path):
    _, urls = digit_shards
    marker = tmp_path / "died"
    config = train_config(tmp_path / "ray", urls)
    config.model = ModelConfig(
        arch="tests.test_train_ray:dies_once",
        projector_dims=[16],
        kwargs={"marker": str(marker), "width": 8, "out_dim": 16},
    )
    config.ray = True
    summary = run_train(config)
    assert marker.exists() and summary["ran_on"].startswith("ray node ")
    local = dataclasses.replace(config, output=str(tmp_path / "local"), ray=False)
    with one_thread():
        run_train(local)  # the marker is there: this one lives
    assert_same_run(tmp_path / "ray", tmp_path / "local")
    # No retries left: the lost task is the error (so the run above was run again).
    config.model.kwargs["marker"] = str(tmp_path / "died-again")
    config.runtime.max_retries = 0
    with pytest.raises(RayError):
        run_train(config)


def test_ray_job_submit_of_jobs_train(local, digit_shards, ray_session, tmp_path):
    """`ray job submit -- python -m jobs.train --config job.yaml` against the session's head:
    Ray sets RAY_ADDRESS, so the loop runs in a task there; the driver writes the outputs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    _, urls = digit_shards
    out = tmp_path / "run"
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(to_dict(train_config(out, urls))))
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit",
         "--address", ray_session.dashboard, "--working-dir", str(REPO), "--",
         sys.executable, "-m", "jobs.train", "--config", str(config_path)],
        env=ray_session.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", log).group(1)
    assert JobSubmissionClient(ray_session.dashboard).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert_same_run(out, local["simclr"])
    summary = json.loads((out / "train.json").read_text())
    assert summary["ran_on"].startswith("ray node ")
    # A job log is not a terminal: the progress came as plain lines, to the last step.
    assert f"train simclr: {STEPS}/{STEPS} steps" in log
