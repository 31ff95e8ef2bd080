"""`velodiff serve`: an HTTP server over one loaded model (FastAPI + uvicorn, ``pip install
'velodiff[serve]'``).

    app.py          the FastAPI application: routes, error shapes, the page
    state.py        what a running server holds (config, store, engine, broker, worker)
    queue.py        the durable bounded job queue (SQLite)
    engine.py       models, request checks, one batch through text2img
    worker.py       the thread that batches compatible jobs and runs them
    events.py       job events from the worker to SSE / websocket subscribers
    jobs_api.py     velodiff's JSON jobs API (/api)
    openai_api.py   OpenAI-compatible POST /v1/images/generations
    comfy_api.py    ComfyUI's /prompt, /queue, /history, /view, /interrupt, /ws
    brush_api.py    region brushes on a finished job's image (POST /api/brush)
    stream.py       streaming image-to-image after StreamDiffusion (one network call per frame)
    stream_api.py   /api/stream, the stream over a websocket
    ray_serve.py    the same application as a Ray Serve deployment (--ray, --replicas)
    page/           the web page at /
"""
