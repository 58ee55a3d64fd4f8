"""Stage one and two over a corpus of conversations: labels on the assistant's turns only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.config import config_from_dict
from logitcache.errors import TeacherError
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.stages.build_cache import build_cache
from logitcache.stages.train_students import train_students
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.manifest import Manifest
from tests import fixtures_models
from tests.stages.test_build_cache import read_all
from tests.stages.test_train_students import STUDENT


@pytest.fixture(scope="module")
def chat_teacher(tmp_path_factory, tiny_tokenizer_dir):
    return fixtures_models.build_tiny_chat_lm(tmp_path_factory.mktemp("chat_lm"), tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_corpus") / "chat.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fixtures_models.chat_conversations()),
                    encoding="utf-8")
    return path


def chat_job(tmp_path, corpus_file, teacher, **sections):
    data = {
        "cache": str(tmp_path / "cache"),
        "corpus": {"data_files": [str(corpus_file)], "messages_column": "messages", "lang_column": "lang",
                   "id_column": "id", "unit_documents": 3},
        "teacher": {"model": str(teacher), "batch_tokens": 600},
        "windows": {"max_length": 96, "stride": 16},
        "soft_labels": {"mode": "topk", "k": 8, "values": "float32"},
        "students": [{"name": "s", "model": {"config": STUDENT}, "loss": {"alpha": 0.5}}],
        "train": {"steps": 3, "batch_tokens": 192, "output": str(tmp_path / "out")},
        "eval": {"held_out_fraction": 0.25},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


def test_a_chat_cache_labels_the_assistant_turns_as_a_plain_forward_does(tmp_path, chat_corpus, chat_teacher):
    cfg = chat_job(tmp_path, chat_corpus, chat_teacher)
    summary = build_cache(cfg, progress=False)
    assert summary.units_built == 3 and not summary.skipped_documents
    _, block = read_all(tmp_path / "cache")
    tokenizer = AutoTokenizer.from_pretrained(chat_teacher)
    model = AutoModelForCausalLM.from_pretrained(chat_teacher).eval()
    conversations = {row["id"]: row["messages"] for row in fixtures_models.chat_conversations()}
    turns = sum(1 for messages in conversations.values() for m in messages if m["role"] == "assistant")
    assert len(set(block.doc_key)) == len(conversations) and block.num_records >= turns

    offsets, labels = block.token_offsets, block.label_offsets
    for r in range(block.num_records):
        ids = block.input_ids[offsets[r]:offsets[r + 1]].astype(np.int64)
        context = int(block.context_length[r])
        messages = conversations[block.doc_key[r]]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        start = next(s for s in range(len(full)) if full[s:s + len(ids)] == ids.tolist())  # where the window is
        # every labelled position predicts a token of an assistant message (or ends its turn)
        targets = tokenizer.decode(full[start + context + 1:start + len(ids)])
        assert "<|im_start|>" not in targets and "user" not in targets
        assert any(targets.replace("<|im_end|>\n", "") in m["content"] for m in messages if m["role"] == "assistant")
        with torch.no_grad():  # the teacher saw the window, from the conversation's start where it fits
            logits = model(torch.from_numpy(ids)[None]).logits[0, context:]
        want = torch.log_softmax(logits.float(), -1).topk(8).indices.numpy()
        got = block.topk_ids[labels[r]:labels[r + 1]]
        assert np.array_equal(np.sort(got, axis=1), np.sort(want, axis=1))

    manifest = Manifest.load(CacheLocation(str(tmp_path / "cache")))
    assert manifest.corpus["chat"] == {"label_roles": ["assistant"], "chat_template": "the teacher tokenizer's"}
    assert manifest.corpus["columns"]["messages"] == "messages"

    train_students(cfg, progress=False)
    dataset = CacheDataset(str(tmp_path / "cache"))
    record = next(iter(dataset))
    assert record.context_length > 0 and len(record.input_ids) > record.context_length


def test_a_teacher_without_a_chat_template_is_refused_before_any_shard(tmp_path, chat_corpus, tiny_tokenizer_dir):
    teacher = fixtures_models.build_tiny_chat_lm(tmp_path / "lm", tiny_tokenizer_dir, template=None)
    with pytest.raises(TeacherError, match="no chat template"):
        build_cache(chat_job(tmp_path, chat_corpus, teacher), progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists() or not Manifest.load(
        CacheLocation(str(tmp_path / "cache"))).shards
    given = chat_job(tmp_path, chat_corpus, teacher, corpus={"chat_template": fixtures_models.CHATML_TEMPLATE})
    assert build_cache(given, progress=False).units_built == 3
