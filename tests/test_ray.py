"""`velodiff generate-set --ray local`: a local 2-worker Ray cluster gives the same manifest and the
same image bytes as the single-process run, also when a worker dies mid-shard (retried, no duplicates);
an unreachable address is one error line. Skipped when Ray is not installed.

The dying worker is the test's own: a subclass of the production actor whose ``render`` kills its
process the first time (a marker file makes it once per test, across restarts), put in place of
``ray_runner.ShardWorker`` for the test. Defined inside a function, cloudpickle ships the class to
the workers by value (its base, the production actor, by reference)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("ray")

from velodiff.cli import main  # noqa: E402
from velodiff.sets import ray_runner  # noqa: E402
from velodiff.sets.prompts import load_prompt_file  # noqa: E402
from velodiff.sets.run import generate_set  # noqa: E402
from velodiff.sets.store import LINES, read_records  # noqa: E402

pytestmark = pytest.mark.slow

N = 8
CONFIG = dict(seed=3, images_per_prompt=1, steps=2, solver=None, grid=None, guidance=None, negative=None,
              height=None, width=None, batch=2, threads=1, noise="velodiff", plan="none")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import sd_tiny

    root = tmp_path_factory.mktemp("ray")
    model = sd_tiny.save_sd(root / "tiny", "sd1")
    prompts = root / "prompts.json"
    prompts.write_text("[" + ", ".join(f'"a red cube number {i}"' for i in range(N)) + "]")
    ref = root / "single"
    generate_set(load_prompt_file(prompts), ref, model_path=model, config=CONFIG)
    return model, prompts, ref


def worker_that_dies_once(marker: str) -> type:
    """The production actor, except that the first shard any replica gets kills its process."""

    class DiesOnceMidShard(ray_runner.ShardWorker):
        def render(self, chunk):
            if not os.path.exists(marker):
                Path(marker).write_text(str(chunk[0].index))
                os._exit(1)
            return super().render(chunk)

    return DiesOnceMidShard


def test_ray_local_two_workers_same_bytes_with_a_dead_worker(setup, tmp_path, monkeypatch):
    model, prompts, ref = setup
    out = tmp_path / "ray"
    marker = tmp_path / "died"
    monkeypatch.setattr(ray_runner, "ShardWorker", worker_that_dies_once(str(marker)))
    summary = generate_set(load_prompt_file(prompts), out, model_path=model, config=CONFIG, ray="local",
                           workers=2)
    assert marker.is_file(), "the fault hook did not fire: no worker died"
    assert summary.generated == N
    assert (out / LINES).read_bytes() == (ref / LINES).read_bytes()
    records, bad = read_records(out)
    assert sorted(records) == list(range(N)) and bad == 0
    assert len((out / LINES).read_bytes().splitlines()) == N  # each index once
    for r in records.values():
        assert (out / r["file"]).read_bytes() == (ref / r["file"]).read_bytes()


def test_unreachable_ray_address_is_one_error_line(setup, tmp_path, capsys):
    model, prompts, _ = setup
    out = tmp_path / "set"
    code = main(["generate-set", str(prompts), "--out", str(out), "--model", str(model), "--steps", "2",
                 "--ray", "127.0.0.1:9"])
    _, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "unreachable" in lines[0] and "Traceback" not in err, err


def test_a_ray_scheme_address_is_checked_at_its_host_and_port():
    """ray://host:port (Ray Client) and host:port reach the same socket: a listening port is accepted in
    either form (no cluster is started)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}", f"ray://127.0.0.1:{port}/"):
            ray_runner.check_address(address)


def test_a_failing_shard_is_tried_three_times_then_named():
    from collections import deque

    from velodiff.errors import VelodiffError
    from velodiff.sets.items import Item

    chunk = [Item(i, "p", i, f"images/{i:06d}.png", {}) for i in (4, 5)]
    pending, tries = deque(), {}
    for _ in range(ray_runner.MAX_SHARD_TRIES - 1):
        assert ray_runner._retry(chunk, tries, pending, RuntimeError("worker died")) is None
        assert pending.popleft() == chunk and not pending
    with pytest.raises(VelodiffError, match="shard of images 4-5 failed 3 times on Ray workers: worker died"):
        ray_runner._retry(chunk, tries, pending, RuntimeError("worker died"))
    assert not pending
