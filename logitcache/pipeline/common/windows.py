"""Cut documents into the windows the teacher sees.

A document longer than ``max_length`` tokens becomes several windows. With ``stride`` s,
each window after the first starts s tokens before the previous one ended: those s tokens
are *left context* (the teacher sees them, so the labels after them are computed with
context) and their positions are not labelled again. Every token position of a document is
therefore labelled exactly once, whatever the stride. A window never spans two documents
(the teacher's batches may put several windows in one row, each attending only to itself:
:mod:`~logitcache.pipeline.capture.batches`).

For sequence classification a document is one record: its first ``max_length`` tokens.
A conversation (``corpus.messages_column``) becomes one window per labelled turn, whose left
context is the conversation before the turn (:mod:`~logitcache.pipeline.common.chat`).

A window's ``record_id`` is a 64-bit hash of (document key, window index): stable across
runs, machines and work-unit boundaries, and the key stage two uses to split held-out data.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from logitcache.config import WindowsConfig
from logitcache.pipeline.common.chat import ChatSpec, render_conversation, turn_windows


@dataclass(frozen=True, kw_only=True)
class Window:
    record_id: int
    doc_key: str
    lang: str
    label: int | None
    window_index: int
    input_ids: np.ndarray  # int64 [n]: context tokens first, then the labelled ones
    context_length: int


def record_id_for(doc_key: str, window_index: int) -> int:
    digest = hashlib.blake2b(f"{doc_key}\x00{window_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def window_spans(num_tokens: int, *, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, stop, context_length) of each window over ``num_tokens`` tokens."""
    if num_tokens <= 0:
        return []
    spans = [(0, min(max_length, num_tokens), 0)]
    while spans[-1][1] < num_tokens:
        start = spans[-1][1] - stride
        spans.append((start, min(start + max_length, num_tokens), stride))
    return spans


def tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's own special tokens, no truncation."""
    if not texts:
        return []
    # tokenizers warn about inputs longer than model_max_length: windows handle those
    logger = logging.getLogger("transformers.tokenization_utils_base")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        encoded = tokenizer(list(texts), add_special_tokens=True, truncation=False,
                            return_attention_mask=False)
    finally:
        logger.setLevel(level)
    return encoded["input_ids"]


def make_windows(documents, tokenizer, cfg: WindowsConfig, *, task: str = "causal_lm",
                 chat: ChatSpec | None = None) -> tuple[list[Window], int]:
    """Windows of ``documents`` (objects with key, text, lang, label, messages) in document order;
    conversations (``messages``) are rendered with ``chat`` and windowed per labelled turn
    (:mod:`~logitcache.pipeline.common.chat`).

    Returns the windows and the number of documents that produced no tokens (or no labelled
    turn) at all.
    """
    documents = list(documents)
    windows: list[Window] = []
    no_tokens = 0
    plain = [d for d in documents if getattr(d, "messages", None) is None]
    plain_ids = iter(tokenize(tokenizer, [d.text for d in plain]))
    for doc in documents:
        if getattr(doc, "messages", None) is not None:
            if chat is None:
                raise ValueError("a conversation needs a ChatSpec")
            ids, ranges = render_conversation(tokenizer, doc.messages, chat)
            spans = turn_windows(ranges, max_length=cfg.max_length, stride=cfg.stride)
        else:
            ids = np.asarray(next(plain_ids), dtype=np.int64)
            if task == "sequence_classification":
                spans = [(0, min(cfg.max_length, len(ids)), 0)] if ids.size else []
            else:
                spans = window_spans(len(ids), max_length=cfg.max_length, stride=cfg.stride)
        if not spans:
            no_tokens += 1
            continue
        for index, (start, stop, context) in enumerate(spans):
            windows.append(Window(
                record_id=record_id_for(doc.key, index), doc_key=doc.key, lang=doc.lang,
                label=doc.label, window_index=index, input_ids=ids[start:stop],
                context_length=context,
            ))
    return windows, no_tokens
