import os
import shutil
import tempfile

import pytest
import torch

# `make test` runs two xdist workers on two cores: one torch thread each avoids oversubscription,
# which slows small-tensor work by orders of magnitude on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """A command run in-process with ``--threads N`` (or the trainer's default of 2) sets torch's
    threads for the whole worker: back to one after each test, so later tests do not oversubscribe."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


_session_cache: dict[str, str | None] = {}


def pytest_configure(config):
    """The tests never read or write the user's velodiff cache (~/.cache/velodiff): a reference, a
    calibration or a hash remembered there by an earlier run (or another version) would decide what a test
    sees. One fresh cache per test session, shared by its xdist workers (they inherit the environment)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        _session_cache["before"] = os.environ.get("VELODIFF_CACHE")
        root = tempfile.mkdtemp(prefix="velodiff-test-cache-")
        _session_cache["root"] = os.environ["VELODIFF_CACHE"] = root


def pytest_unconfigure(config):
    if "root" in _session_cache:
        shutil.rmtree(_session_cache.pop("root"), ignore_errors=True)
        before = _session_cache.pop("before")
        if before is None:
            os.environ.pop("VELODIFF_CACHE", None)
        else:
            os.environ["VELODIFF_CACHE"] = before


def required_options(name: str, schedule) -> dict:
    """What a solver needs beyond its defaults to run in the tests that run every solver: DPM-Solver-v3
    gets degenerate statistics (l = 1, s = b = 0) over the schedule's log-SNR range, under which it is a
    DPM-Solver++-type multistep method (its own tests use measured ones)."""
    from velodiff.grids import make_grid
    from velodiff.solvers import get_solver
    from velodiff.solvers.dpm_solver_v3 import ModelStatistics

    if "ems" not in get_solver(name).requires:
        return {}
    lams = schedule.log_snr(make_grid("logsnr", schedule, 50)[:-1])
    return {"ems": ModelStatistics.degenerate(lams[lams.isfinite()])}  # (a flow's t = 1: lambda = -inf)


def spy_rule(record=lambda req, result: (req.step, result.exact, result.cost), layer: int = 100):
    """A plan rule that only watches: its ``log`` holds ``record(request, result)`` for each evaluation it
    sees, from its layer (100: outermost; lower to sit between two rules). A fresh log per run."""
    from velodiff.plan import Accelerator

    class Spy(Accelerator):
        name = "spy"

        def begin(self, run):
            super().begin(run)
            self.log = []

        def evaluate(self, req, inner):
            result = inner(req)
            self.log.append(record(req, result))
            return result

    Spy.layer = layer
    return Spy()
