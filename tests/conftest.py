"""Session-wide test setup: offline Hugging Face libraries and tiny model/corpus fixtures.

The offline variables are set before anything imports ``huggingface_hub`` (which reads them
at import time), so no test can reach the network: loading a hub name fails fast instead.
"""

from __future__ import annotations

import os

for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from tests import fixtures_models  # noqa: E402


@pytest.fixture(scope="session")
def multilingual_texts() -> list[dict[str, Any]]:
    """50 documents {id, text, lang, label} in en, de, es, ru, zh, ar, hi."""
    return fixtures_models.multilingual_texts()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, multilingual_texts) -> Path:
    """A directory with part-0.jsonl and part-1.jsonl (columns id, text, lang, label)."""
    return fixtures_models.write_corpus(tmp_path_factory.mktemp("corpus"), multilingual_texts)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab 400; <pad> <bos> <eos> <unk>) saved with save_pretrained."""
    return fixtures_models.build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny Llama causal LM whose vocab equals len(tokenizer), with its tokenizer."""
    return fixtures_models.build_tiny_causal_lm(tmp_path_factory.mktemp("causal_lm"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_causal_lm_padded_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """Like tiny_causal_lm_dir, but the model's vocab is padded up to a multiple of 64."""
    return fixtures_models.build_tiny_causal_lm(
        tmp_path_factory.mktemp("causal_lm_padded"), tiny_tokenizer_dir, pad_vocab_to=64)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny LlamaForSequenceClassification with 3 labels, with its tokenizer."""
    return fixtures_models.build_tiny_classifier(tmp_path_factory.mktemp("classifier"), tiny_tokenizer_dir)
