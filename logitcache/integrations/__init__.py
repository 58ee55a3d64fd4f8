"""Training stacks other than ``logitcache train`` reading a cache: Hugging Face's Trainer
(:mod:`logitcache.integrations.transformers`) and loops of one's own.

These modules join logitcache's reader and losses to another library's training loop; the
cache, its batches and the loss are the ones stage two uses, so a student trained either way
sees the same data and the same objective.
"""
