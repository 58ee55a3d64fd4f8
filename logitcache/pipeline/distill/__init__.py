"""Stage two's parts: the streaming reader over a cache, packing into batches, losses on
sparse targets, students, training steps, checkpoints, data parallelism, metrics and the
report."""
