"""``velodiff serve --ray local|ADDRESS --replicas N``: the same FastAPI application as a Ray Serve
deployment, one model replica per Ray worker.

Every replica runs the whole application (all APIs, its own batching worker) over the one SQLite job
store, so the replicas share the queue: a job submitted through any replica is claimed by whichever
worker is free (claims are transactions), and its result is read from the store by whichever replica
the client asks. Ray Serve's proxy routes requests over the replicas. The driver recovers jobs a killed
server left running once, before the replicas start. The store is a file: the replicas must share a
file system (one machine, or a shared volume). Live progress (SSE progress events, ComfyUI's /ws) reaches
clients connected to the replica that runs the job; final states reach every replica (polled).

``--ray local`` starts a Ray cluster on this machine (node address 127.0.0.1; Ray 2.60's own gRPC services
still listen on every interface, README); ``--ray HOST:PORT`` joins one.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

from .state import ServeConfig


def build_app(config: ServeConfig):  # noqa: ANN201 - runs on each replica
    from .app import create_app

    return create_app(config)


def serve_with_ray(config: ServeConfig, address: str, replicas: int) -> None:
    import ray
    from ray import serve

    from .queue import JobStore

    store = JobStore(config.db, max_queue=config.max_queue, max_history=config.max_history)
    recovered = store.recover()  # held (the store's owner) until the replicas are shut down
    local = address == "local"
    if local:
        ray.init(
            num_cpus=max(replicas, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    else:
        try:
            ray.init(address=address, log_to_driver=False)
        except (ValueError, ConnectionError) as e:  # a malformed address, or no cluster there
            from ..errors import VelodiffError, first_line

            store.close()
            raise VelodiffError(
                f"--ray {address!r}: {first_line(e)} (give 'local' or a cluster's HOST:PORT)"
            ) from None
    serve.start(http_options={"host": config.host, "port": config.port})
    replica = replace(config, recover=False, db=config.db.resolve())
    deployment = serve.deployment(
        serve.ingress(lambda: build_app(replica))(),
        name="velodiff",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": 1},
        max_ongoing_requests=max(64, config.max_queue * 2),
    )
    serve.run(deployment.bind(), name="velodiff", route_prefix="/")
    print(
        f"velodiff serve: {replicas} Ray Serve replicas of {config.model} on "
        f"http://{config.host}:{config.port}/ (recovered {recovered} jobs)",
        flush=True,
    )
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
        store.close()
