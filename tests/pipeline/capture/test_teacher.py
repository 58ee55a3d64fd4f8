"""Tests of loading the teacher: split head against the full forward, identities, errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from logitcache.config import TeacherConfig
from logitcache.errors import TeacherError
from logitcache.pipeline.capture.teacher import (
    Teacher,
    load_teacher,
)
from logitcache.pipeline.common.hf_models import tokenizer_fingerprints
from tests import fixtures_models


def load(path, **kwargs) -> Teacher:
    return load_teacher(TeacherConfig(model=str(path), **{"device": "cpu", "dtype": "float32", **kwargs}))


def batch(teacher: Teacher, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = teacher.tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.fixture(scope="module")
def teacher(tiny_causal_lm_dir) -> Teacher:
    return load(tiny_causal_lm_dir)


@pytest.fixture(scope="module")
def texts(multilingual_texts) -> list[str]:
    by_lang = {doc["lang"]: doc["text"] for doc in multilingual_texts}  # one per language
    return list(by_lang.values())


def assert_split_head_matches(teacher: Teacher, texts: list[str], atol: float) -> None:
    input_ids, attention_mask = batch(teacher, texts)
    assert (attention_mask == 0).any(), "the batch should contain padding"
    keep = attention_mask.bool()
    reference = teacher.logits(input_ids, attention_mask)[keep]
    hidden = teacher.hidden_states(input_ids, attention_mask)
    assert hidden.shape == (*input_ids.shape, teacher.model.config.hidden_size)
    split = teacher.head(hidden[keep])
    assert split.shape == reference.shape == (int(keep.sum()), teacher.vocab_size)
    assert split.dtype == teacher.dtype
    torch.testing.assert_close(split.float(), reference.float(), atol=atol, rtol=0)


def test_causal_lm_split_head_equals_full_forward(teacher, texts):
    assert teacher.task == "causal_lm" and teacher.num_classes == 0
    assert teacher.device == torch.device("cpu") and teacher.dtype == torch.float32
    assert teacher.vocab_size == len(teacher.tokenizer) == 400
    assert teacher.split_head_ok is True
    assert not teacher.model.training
    assert_split_head_matches(teacher, texts, atol=1e-5)


def test_identity_and_tokenizer_info(teacher, tiny_causal_lm_dir):
    identity = teacher.identity
    assert identity["name_or_path"] == str(tiny_causal_lm_dir)
    assert identity["task"] == "causal_lm" and identity["dtype"] == "float32"
    assert identity["model_type"] == "llama" and identity["num_parameters"] > 0
    assert len(identity["weights_sha256"]) == 64
    info = teacher.tokenizer_info
    assert info["vocab_size"] == 400 and len(info["fingerprint"]) == len(info["vocab_fingerprint"]) == 64
    assert info["special_tokens"]["pad_token"] == ["<pad>", 0]
    assert info["special_tokens"]["eos_token"] == ["<eos>", 2]


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gpt2", "gpt_neox"])
def test_split_head_is_generic_over_architectures(model_type, tmp_path, tiny_tokenizer_dir, texts):
    path = fixtures_models.build_tiny_causal_lm(tmp_path / model_type, tiny_tokenizer_dir, model_type=model_type)
    teacher = load(path)
    assert teacher.split_head_ok is True
    assert_split_head_matches(teacher, texts, atol=1e-5)


def test_padded_vocab(tiny_causal_lm_padded_dir, texts):
    teacher = load(tiny_causal_lm_padded_dir)
    assert len(teacher.tokenizer) == 400
    assert teacher.vocab_size == 448 and teacher.vocab_size % 64 == 0
    assert teacher.tokenizer_info["vocab_size"] == 400
    assert teacher.split_head_ok is True
    assert_split_head_matches(teacher, texts, atol=1e-5)


def test_weights_sha256_follows_the_weights(teacher, tiny_causal_lm_dir, tmp_path):
    copy = shutil.copytree(tiny_causal_lm_dir, tmp_path / "copy")
    assert load(copy).identity["weights_sha256"] == teacher.identity["weights_sha256"]
    changed = load(copy)
    with torch.no_grad():
        changed.model.model.norm.weight[0] += 1.0
    changed.model.save_pretrained(tmp_path / "changed")
    changed.tokenizer.save_pretrained(tmp_path / "changed")
    assert load(tmp_path / "changed").identity["weights_sha256"] != teacher.identity["weights_sha256"]


def test_tokenizer_fingerprint_is_stable_and_distinguishes(teacher, tiny_causal_lm_dir, tmp_path):
    again = load(tiny_causal_lm_dir)
    batch(again, ["padding and truncation change the backend's state", "x"])
    assert tokenizer_fingerprints(again.tokenizer) == tokenizer_fingerprints(teacher.tokenizer)
    assert again.tokenizer_info == teacher.tokenizer_info

    from transformers import AutoTokenizer

    other_dir = fixtures_models.build_tiny_tokenizer(tmp_path / "other", vocab_size=320)
    other = tokenizer_fingerprints(AutoTokenizer.from_pretrained(other_dir))
    assert other["fingerprint"] != teacher.tokenizer_info["fingerprint"]
    assert other["vocab_fingerprint"] != teacher.tokenizer_info["vocab_fingerprint"]
    # same vocabulary, different post-processing: only the full fingerprint differs
    no_bos_dir = fixtures_models.build_tiny_tokenizer(tmp_path / "no_bos", add_bos=False)
    no_bos = tokenizer_fingerprints(AutoTokenizer.from_pretrained(no_bos_dir))
    assert no_bos["vocab_fingerprint"] == teacher.tokenizer_info["vocab_fingerprint"]
    assert no_bos["fingerprint"] != teacher.tokenizer_info["fingerprint"]


def test_classifier(tiny_classifier_dir, texts):
    teacher = load(tiny_classifier_dir, task="sequence_classification")
    assert teacher.task == "sequence_classification" and teacher.num_classes == 3
    assert teacher.split_head_ok is False
    input_ids, attention_mask = batch(teacher, texts)
    logprobs = teacher.class_logprobs(input_ids, attention_mask)
    assert logprobs.shape == (len(texts), 3) and logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(len(texts)))
    # padding does not change a sequence's prediction
    alone = teacher.class_logprobs(input_ids[:1, : int(attention_mask[0].sum())], attention_mask[:1, : int(attention_mask[0].sum())])
    torch.testing.assert_close(alone, logprobs[:1], atol=1e-5, rtol=0)


def test_dtypes(tiny_causal_lm_dir, texts):
    assert load(tiny_causal_lm_dir, dtype="auto").dtype == torch.float32
    teacher = load(tiny_causal_lm_dir, dtype="bfloat16")
    assert teacher.dtype == torch.bfloat16 and teacher.identity["dtype"] == "bfloat16"
    assert next(teacher.model.parameters()).dtype == torch.bfloat16
    input_ids, attention_mask = batch(teacher, texts)
    assert teacher.logits(input_ids, attention_mask).dtype == torch.bfloat16
    assert teacher.split_head_ok is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_teacher_error(tiny_causal_lm_dir):
    with pytest.raises(TeacherError, match="no CUDA GPU") as caught:
        load(tiny_causal_lm_dir, device="cuda")
    assert caught.value.exit_code == 2


def test_missing_path(tmp_path):
    with pytest.raises(TeacherError, match="does not exist") as caught:
        load(tmp_path / "no-such-model")
    assert caught.value.exit_code == 2
    with pytest.raises(TeacherError, match="without config.json"):
        load(tmp_path)


def test_hub_name_offline_fails_fast():
    with pytest.raises(TeacherError, match="network access") as caught:
        load("some-org/not-a-local-model")
    assert "local path" in str(caught.value)


def test_wrong_task(tiny_classifier_dir, tiny_causal_lm_dir):
    with pytest.raises(TeacherError, match="LlamaForSequenceClassification") as caught:
        load(tiny_classifier_dir, task="causal_lm")
    assert "teacher.task: sequence_classification" in str(caught.value)
    with pytest.raises(TeacherError, match="LlamaForCausalLM"):
        load(tiny_causal_lm_dir, task="sequence_classification")


def test_tokenizer_larger_than_vocab(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    small = fixtures_models.build_tiny_tokenizer(tmp_path / "small", vocab_size=300)
    path = fixtures_models.build_tiny_causal_lm(tmp_path / "model", small)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(path)  # 400 tokens, 300 rows
    with pytest.raises(TeacherError, match="out of range"):
        load(path)


def test_tokenizer_without_pad_gets_eos(tmp_path, tiny_causal_lm_dir, texts):
    from transformers import AutoTokenizer

    path = shutil.copytree(tiny_causal_lm_dir, tmp_path / "no_pad")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    teacher = load(path)
    assert teacher.tokenizer.pad_token == "<eos>"
    assert teacher.tokenizer_info["pad_token_set_to"] == "<eos>"
    assert "pad_token" not in teacher.tokenizer_info["special_tokens"]
    assert_split_head_matches(teacher, texts, atol=1e-5)


def test_softcapped_logits_disable_the_split_head(tmp_path, tiny_tokenizer_dir):
    path = fixtures_models.build_tiny_causal_lm(tmp_path / "gemma2", tiny_tokenizer_dir,
                                                model_type="gemma2", final_logit_softcapping=0.5)
    teacher = load(path)
    assert teacher.split_head_ok is False
    input_ids, attention_mask = batch(teacher, ["a short text"])
    hidden = teacher.hidden_states(input_ids, attention_mask)
    assert not torch.allclose(teacher.head(hidden), teacher.logits(input_ids, attention_mask), atol=1e-4)


def test_scaled_logits_fail_the_numeric_check(tiny_causal_lm_dir, monkeypatch):
    teacher = load(tiny_causal_lm_dir)
    assert teacher.check_split_head() is True
    forward = teacher.model.forward

    def scaled(*args, **kwargs):
        output = forward(*args, **kwargs)
        output.logits = output.logits * 1.5
        return output

    monkeypatch.setattr(teacher.model, "forward", scaled)
    assert teacher.check_split_head() is False


@pytest.mark.parametrize("device_map", ["auto", "sequential", {"model.embed_tokens": "cpu", "model.layers": "cpu",
                                                               "model.norm": "cpu", "model.rotary_emb": "cpu",
                                                               "lm_head": "cpu"}],
                         ids=["auto", "sequential", "mapping"])
def test_a_teacher_placed_by_a_device_map_labels_as_one_on_a_device(tiny_causal_lm_dir, texts, device_map):
    placed = load_teacher(TeacherConfig(model=str(tiny_causal_lm_dir), dtype="float32", device_map=device_map))
    whole = load(tiny_causal_lm_dir)
    assert placed.device == placed.label_device == torch.device("cpu")
    assert placed.split_head_ok and placed.identity == whole.identity
    input_ids, attention_mask = batch(whole, texts)
    keep = attention_mask.bool()
    assert torch.allclose(placed.head(placed.hidden_states(input_ids, attention_mask)[keep]),
                          whole.head(whole.hidden_states(input_ids, attention_mask)[keep]), atol=1e-5)


def test_a_device_map_with_a_device_or_an_unknown_strategy_is_refused(tiny_causal_lm_dir):
    from logitcache.errors import ConfigError

    with pytest.raises(ConfigError, match="leave teacher.device at auto"):
        TeacherConfig(model=str(tiny_causal_lm_dir), device="cpu", device_map="auto")
    with pytest.raises(ConfigError, match="must be one of auto, balanced"):
        TeacherConfig(model=str(tiny_causal_lm_dir), device_map="fastest")
