"""Batch generation: image sets from prompt files (``velodiff generate-set``), sharded, resumable,
byte-identical however they are run (one process, resumed after a kill, or over Ray workers).

* :mod:`~velodiff.sets.prompts`     - prompt files: text, JSON lists, COCO captions;
* :mod:`~velodiff.sets.items`       - which image is which: prompt, seed, file, batch-aligned chunks;
* :mod:`~velodiff.sets.fingerprint` - the model's fingerprint, recorded in the set's header;
* :mod:`~velodiff.sets.store`       - the set folder: header, manifest lines, images, resume, reading;
* :mod:`~velodiff.sets.render`      - rendering a chunk of images (in process and on Ray workers);
* :mod:`~velodiff.sets.run`         - :func:`generate_set`: local runs, and the entry to Ray runs;
* :mod:`~velodiff.sets.ray_runner`  - the Ray actors and the driver loop (optional: ``velodiff[ray]``).

Metrics of a set (``velodiff eval --manifest``) live in :mod:`velodiff.eval.set_metrics`.
"""
