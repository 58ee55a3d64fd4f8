"""Pipeline parts both stages use: the corpus, windows, the held-out split, model helpers,
right-padding of token batches, and the background committer that stage one and ``repack``
write shards through."""
