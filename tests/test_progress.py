"""Progress on stderr: a tqdm bar on a terminal, plain periodic lines otherwise, nothing on
stdout (which carries results), nothing at all with `progress=false`.

The class is driven directly (a stream that says it is a terminal forces the bar), through
the thread and Ray maps of the offline verbs, and through the verbs themselves: fit and
build on the session's Ray, the search index build at the end of build, and dedup.
"""

from __future__ import annotations

import contextlib
import functools
import io
import pickle
import re

import pytest

from pipeline.cli import main
from pipeline.config import RuntimeConfig
from pipeline.runtime.progress import Counted, Progress
from pipeline.runtime.tasks import ray_map, thread_map


class Terminal(io.StringIO):
    """A stream that says it is a terminal: Progress draws a tqdm bar on it."""

    def isatty(self) -> bool:
        return True


def plain_lines(text: str, label: str) -> list[str]:
    """The plain progress lines of `label` (a bar's redraws start with a carriage return)."""
    return [line for line in text.split("\n") if line.startswith(f"{label}: ")]


def test_lines_off_a_terminal_reach_the_total(capsys):
    stream = io.StringIO()
    progress = Progress("build", 5, stream=stream, every=0.0)
    for _ in range(5):
        progress.update(12, note="loss 0.5")
    progress.update(12)  # past the end: closed, nothing more
    progress.close()
    lines = plain_lines(stream.getvalue(), "build")
    assert len(lines) == 5 and lines[0].startswith("build: 1/5 shards, 12 examples")
    assert lines[-1].startswith("build: 5/5 shards, 60 examples,")
    assert "ETA 0m00s, loss 0.5" in lines[-1] and "examples/s" in lines[-1]
    assert re.search(r"ETA \d+m\d\ds", lines[1])
    assert capsys.readouterr().out == ""


def test_lines_are_periodic_first_and_last_always():
    stream = io.StringIO()
    progress = Progress("fit/covariance", 50, stream=stream, every=3600.0)
    for _ in range(50):
        progress.update(3)
    lines = plain_lines(stream.getvalue(), "fit/covariance")
    assert [line.split(",")[0] for line in lines] == [
        "fit/covariance: 1/50 shards",
        "fit/covariance: 50/50 shards",
    ]


def test_a_bar_on_a_terminal_with_eta_and_counts(capsys):
    stream = Terminal()
    with Progress("train simclr", 8, "steps", stream=stream) as progress:
        for _ in range(8):
            progress.update(16, note="loss 4.2")
    text = stream.getvalue()
    assert "\r" in text and not plain_lines(text, "train simclr")  # drawn in place
    final = text.rsplit("\r", 1)[-1]
    assert final.startswith("train simclr: 100%") and "8/8 [" in final
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", final)  # elapsed < remaining (the ETA)
    assert "128 examples, loss 4.2" in final
    assert capsys.readouterr().out == ""


def test_disabled_prints_nothing():
    for stream in (io.StringIO(), Terminal()):
        with Progress("build", 3, stream=stream, enabled=False) as progress:
            for _ in range(3):
                progress.update(1)
        assert stream.getvalue() == "" and progress.shards == 3


def test_closed_short_of_the_total_prints_where_it_stopped():
    stream = io.StringIO()
    progress = Progress("build", 4, stream=stream, every=3600.0)
    progress.update(5)
    progress.update(5)
    progress.close()
    progress.close()
    assert [line.split(",")[0] for line in plain_lines(stream.getvalue(), "build")] == [
        "build: 1/4 shards",
        "build: 2/4 shards",
    ]


def square(x: int) -> int:
    return x * x


def test_counted_in_threads_and_pickled_as_the_plain_function():
    stream = io.StringIO()
    progress = Progress("dedup edges", 20, "batches", stream=stream, every=0.0)
    counted = progress.counted(square, lambda item, result: result)
    assert thread_map(4)(counted, range(20)) == [x * x for x in range(20)]
    assert progress.shards == 20 and progress.examples == sum(x * x for x in range(20))
    assert plain_lines(stream.getvalue(), "dedup edges")[-1].startswith(
        "dedup edges: 20/20 batches, 2,470 examples"
    )
    # Sent to another process it is `fn` alone: no bar (nor its lambda) travels.
    assert pickle.loads(pickle.dumps(counted)) is square


def test_ray_map_counts_on_the_driver(ray_session):
    stream = io.StringIO()
    progress = Progress("search index (search)", 6, stream=stream, every=0.0)
    run, _ = ray_map(RuntimeConfig(address=ray_session.address, cpus_per_worker=0.5))
    counted = progress.counted(functools.partial(pow, 2), lambda item, result: item)
    assert run(counted, list(range(6))) == [2**x for x in range(6)]
    assert isinstance(counted, Counted) and progress.shards == 6 and progress.examples == 15
    assert plain_lines(stream.getvalue(), "search index (search)")[-1].startswith(
        "search index (search): 6/6 shards, 15 examples"
    )


# -- the verbs -------------------------------------------------------------------------------

MODEL = [
    "influence.model.arch=small_cnn",
    "influence.model.projector_dims=[16]",
    "influence.model.kwargs={width: 8, out_dim: 16}",
    "influence.augment.size=28",
    "influence.loss.num_views=4",
    "influence.projection.dim_in=8",
    "influence.projection.dim_out=8",
    "influence.device=cpu",
    "fit.reliability_sample=0",
    "index.search.kind=flat",
    "runtime.num_workers=1",
    "runtime.cpus_per_worker=1",
]


def cli(stderr: io.StringIO, *argv: str, settings: tuple[str, ...] = ()) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(stderr):
        code = main([*argv, *[part for s in settings for part in ("--set", s)]])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def index(digit_shards, ray_session, tmp_path_factory) -> dict:
    """fit and build on the session's Ray, their stdout and stderr kept."""
    _, urls = digit_shards
    output = str(tmp_path_factory.mktemp("progress") / "index")
    on_ray = (*MODEL, f"runtime.address={ray_session.address}")
    runs = {}
    for verb in ("fit", "build"):
        err = io.StringIO()
        code, out = cli(err, verb, "--out", output, "--shards", *urls, settings=on_ray)
        assert code == 0, err.getvalue()
        runs[verb] = (out, err.getvalue())
    return {"output": output, "runs": runs, "shards": len(urls)}


PROGRESS = re.compile(r"^(fit/\w+|build|search index \(\w+\)|dedup \w+): \d+/\d+ ", re.M)


def test_fit_and_build_show_progress_on_stderr_only(index):
    n = index["shards"]
    fit_out, fit_err = index["runs"]["fit"]
    passes = {line.split(":")[0] for line in PROGRESS.findall(fit_err)}
    assert passes and all(p.startswith("fit/") for p in passes)
    for label in passes:
        assert plain_lines(fit_err, label)[-1].startswith(f"{label}: {n}/{n} shards")
    build_out, build_err = index["runs"]["build"]
    assert plain_lines(build_err, "build")[-1].startswith(f"build: {n}/{n} shards, 240 examples")
    search = plain_lines(build_err, "search index (search)")
    assert search[-1].startswith("search index (search): 1/1 shards, 240 examples")
    for out in (fit_out, build_out):
        assert out and not PROGRESS.search(out)  # results only


def test_dedup_shows_each_phase_and_a_bar_on_a_terminal(index):
    settings = ("refine=8", "refine_floor=0.0", "refine_max=40", "chunk=100")
    err = io.StringIO()
    code, out = cli(err, "dedup", "--out", index["output"], settings=settings)
    assert code == 0, err.getvalue()
    text = err.getvalue()
    # 240 rows in 60-row parts, batches of whole parts of >= 100 rows: 2 batches.
    assert plain_lines(text, "dedup edges")[-1].startswith("dedup edges: 2/2 batches, 240 ")
    refine = plain_lines(text, "dedup refine")[-1]
    done = re.match(r"dedup refine: (\d+)/(\d+) shards, (\d+) examples", refine)
    assert done and done[1] == done[2] and int(done[3]) == 40  # refine_max rows re-embedded
    assert plain_lines(text, "dedup lists")[-1].startswith("dedup lists: 4/4 parts")
    assert "\ndedup (influence, tau=0.9" in out and not PROGRESS.search(out)

    terminal = Terminal()  # other settings: the edges are searched again, under a bar
    code, out = cli(terminal, "dedup", "--out", index["output"], settings=(*settings, "k=8"))
    assert code == 0, terminal.getvalue()
    bars = terminal.getvalue()
    assert re.search(r"\rdedup edges: 100%\|[^\r]*\| 2/2 \[", bars)
    assert re.search(r"\rdedup lists: 100%\|[^\r]*\| 4/4 \[", bars)
    assert not plain_lines(bars, "dedup edges") and not PROGRESS.search(out)


def test_dedup_builds_its_search_index_with_progress_unless_off(index):
    """Embedding mode builds `search_z/` first (its progress shown); `progress=false` then
    prints none, though the edges are searched again (other settings)."""
    err = io.StringIO()
    code, _ = cli(err, "dedup", "--out", index["output"], settings=("mode=embedding",))
    assert code == 0, err.getvalue()
    built = plain_lines(err.getvalue(), "search index (search_z)")
    assert built[-1].startswith("search index (search_z): 1/1 shards, 240 examples")
    assert plain_lines(err.getvalue(), "dedup edges")
    err = io.StringIO()
    quiet = ("mode=embedding", "k=4", "progress=false")
    code, out = cli(err, "dedup", "--out", index["output"], settings=quiet)
    assert code == 0 and out.startswith("dedup (embedding, tau=0.99, k=4")
    assert not PROGRESS.search(err.getvalue())
