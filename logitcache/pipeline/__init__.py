"""The parts the stages are built from, grouped by the stage they serve.

- :mod:`~logitcache.pipeline.common`: what both stages use (the corpus, windows of a
  document, the held-out split, Hugging Face model helpers, the background shard committer).
- :mod:`~logitcache.pipeline.capture`: stage one, the teacher's side (loading and running the
  teacher, soft labels, batching windows, labelling a work unit, local and Dask executors,
  the demo teacher).
- :mod:`~logitcache.pipeline.distill`: stage two, the students' side (the streaming reader,
  packing, losses, students, training steps, checkpoints, data parallelism, metrics, report).

Imports point one way: ``common`` uses only ``storage_schemas``, ``config`` and ``errors``;
``capture`` and ``distill`` use ``common`` but never each other (``tests/test_layers.py``).
"""
