"""Stage one's parts: the teacher, its soft labels, batches of windows, one work unit's
labelling, and the executors (local or Dask) that run the units."""
