"""Students: built or loaded, checked against the cache, and run on packed rows."""

import dataclasses

import numpy as np
import pytest
import torch

from logitcache.config import StudentConfig, StudentModelConfig
from logitcache.errors import StudentError
from logitcache.pipeline.common.hf_models import tokenizer_fingerprints
from logitcache.pipeline.distill.collate import TokenPacker
from logitcache.pipeline.distill.students import build_student, cache_pad_id, student_seed
from tests.factories import make_layout, make_template

TINY = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128}


@pytest.fixture(scope="module")
def tokenizer_info(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return {"name_or_path": "tiny", **tokenizer_fingerprints(tok)}


def manifest_for(tokenizer_info, kind="token_topk", vocab_size=None, num_classes=3):
    layout = make_layout(kind, k=4, vocab_size=vocab_size or tokenizer_info["vocab_size"], num_classes=num_classes)
    manifest = make_template(layout)
    manifest.tokenizer = dict(tokenizer_info)
    return manifest


def student_cfg(name="s", **model):
    return StudentConfig(name=name, model=StudentModelConfig(**(model or {"config": dict(TINY)})))


def test_packed_rows_give_each_record_the_hidden_states_it_has_alone(tokenizer_info):
    manifest = manifest_for(tokenizer_info)
    student = build_student(student_cfg(), manifest=manifest, device=torch.device("cpu"), seed=0)
    student.model.eval()
    records = []
    for i, n in enumerate([5, 7, 3]):
        ids = (np.arange(n) * 13 + 7 * i) % 300 + 4
        records.append(dataclasses.make_dataclass("R", ["record_id", "lang", "cursor", "input_ids",
                                                        "context_length", "topk_ids", "topk_values"])(
            i, "en", (0, 0, i, 3), ids, 0, np.zeros((n, 4), dtype=np.int64), np.zeros((n, 4), dtype=np.float32)))
    batch = TokenPacker(manifest.layout, rows=1, length=16, pad_id=0).collate(records)
    with torch.no_grad():
        packed = student.hidden_states(batch.input_ids, batch.position_ids)[0]
        start = 0
        for rec in records:
            n = len(rec.input_ids)
            ids = torch.from_numpy(rec.input_ids)[None]
            alone = student.hidden_states(ids, torch.arange(n)[None])[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n


def test_students_run_in_full_precision_on_the_cpu(tokenizer_info):
    student = build_student(student_cfg(), manifest=manifest_for(tokenizer_info), device=torch.device("cpu"), seed=0)
    ids = torch.arange(6)[None] + 4
    with student.autocast():
        assert not torch.is_autocast_enabled("cpu")
        hidden = student.hidden_states(ids, torch.arange(6)[None])
    assert hidden.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_students_autocast_to_bf16_on_a_gpu(tokenizer_info):
    student = build_student(student_cfg(), manifest=manifest_for(tokenizer_info), device=torch.device("cuda"), seed=0)
    ids = (torch.arange(6)[None] + 4).cuda()
    with student.autocast():
        assert torch.is_autocast_enabled("cuda")
        hidden = student.hidden_states(ids, torch.arange(6)[None].cuda())
    assert bool(torch.isfinite(hidden).all())
    assert next(student.model.parameters()).dtype == torch.float32  # weights stay float32


def test_seeded_init_is_reproducible_and_differs_between_students(tokenizer_info):
    manifest = manifest_for(tokenizer_info)
    a = build_student(student_cfg("a"), manifest=manifest, device=torch.device("cpu"), seed=3)
    a2 = build_student(student_cfg("a"), manifest=manifest, device=torch.device("cpu"), seed=3)
    b = build_student(student_cfg("b"), manifest=manifest, device=torch.device("cpu"), seed=3)
    wa, wa2, wb = (s.model.get_input_embeddings().weight for s in (a, a2, b))
    assert torch.equal(wa, wa2) and not torch.equal(wa, wb)
    assert a.target_width == tokenizer_info["vocab_size"]
    assert student_seed(3, "a") != student_seed(4, "a")


def test_a_mistyped_local_path_is_named_not_sent_to_the_hub(tmp_path, tokenizer_info, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    manifest = manifest_for(tokenizer_info)
    # "runs/fk1" has the form of a hub name, but runs/ is a local directory: a typo, said at once
    with pytest.raises(StudentError, match=r"students\[s\]\.model\.path: 'runs/fk1' does not exist.*'runs'"):
        build_student(student_cfg(path="runs/fk1"), manifest=manifest, device=torch.device("cpu"), seed=0)
    with pytest.raises(StudentError, match=r"students\[s\]\.tokenizer: 'runs/tok' does not exist"):
        build_student(dataclasses.replace(student_cfg(), tokenizer="runs/tok"), manifest=manifest,
                      device=torch.device("cpu"), seed=0)
    with pytest.raises(StudentError, match=r"model\.path: 'runs/a/b' does not exist; give a local directory"):
        build_student(student_cfg(path="runs/a/b"), manifest=manifest, device=torch.device("cpu"), seed=0)


def test_a_student_with_another_tokenizer_is_refused(tmp_path, tokenizer_info):
    from tests.fixtures_models import build_tiny_tokenizer

    other = build_tiny_tokenizer(tmp_path / "other", vocab_size=300)
    cfg = dataclasses.replace(student_cfg(), tokenizer=str(other))
    with pytest.raises(StudentError, match="not the one the cache was built with"):
        build_student(cfg, manifest=manifest_for(tokenizer_info), device=torch.device("cpu"), seed=0)


def test_padding_rows_are_accepted_and_cut_to_the_teacher_width(tokenizer_info, tiny_causal_lm_padded_dir,
                                                                tiny_causal_lm_dir):
    manifest = manifest_for(tokenizer_info)  # teacher width = the tokenizer's 400 tokens
    padded = build_student(student_cfg(path=str(tiny_causal_lm_padded_dir)), manifest=manifest,
                           device=torch.device("cpu"), seed=0)
    assert padded.model.get_output_embeddings().weight.shape[0] == 448
    assert padded.head(torch.zeros(2, 32)).shape == (2, 400)
    # a student narrower than a padded teacher is fine too: the missing rows get a very low logit
    wide = manifest_for(tokenizer_info, vocab_size=448)
    narrow = build_student(student_cfg(path=str(tiny_causal_lm_dir)), manifest=wide, device=torch.device("cpu"), seed=0)
    logits = narrow.head(torch.zeros(2, 32))
    assert logits.shape == (2, 448) and (logits[:, 400:] < -1e3).all()


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tokenizer_info):
    cfg = student_cfg(config={**TINY, "vocab_size": 100})
    with pytest.raises(StudentError, match="smaller than the cache's tokenizer"):
        build_student(cfg, manifest=manifest_for(tokenizer_info), device=torch.device("cpu"), seed=0)


def test_classifier_students_check_classes_and_text_columns(tokenizer_info):
    manifest = manifest_for(tokenizer_info, kind="sequence_probs", num_classes=3)
    ok = build_student(student_cfg(), manifest=manifest, device=torch.device("cpu"), seed=0)
    assert ok.task == "sequence_classification" and ok.model.config.num_labels == 3
    assert ok.model.config.pad_token_id == cache_pad_id(manifest) == 0
    with pytest.raises(StudentError, match="classifies into 2 classes, the cache holds 3"):
        build_student(student_cfg(config={**TINY, "num_labels": 2}), manifest=manifest,
                      device=torch.device("cpu"), seed=0)
    with pytest.raises(StudentError, match="needs its own tokenizer"):
        build_student(dataclasses.replace(student_cfg(), text_column="text_de"), manifest=manifest,
                      device=torch.device("cpu"), seed=0)
    with pytest.raises(StudentError, match="only classification caches"):
        build_student(dataclasses.replace(student_cfg(), text_column="text_de"),
                      manifest=manifest_for(tokenizer_info), device=torch.device("cpu"), seed=0)


def test_the_config_digest_tells_students_apart_and_ignores_an_unset_batch_size():
    import hashlib
    import json

    from logitcache.config import config_to_dict
    from logitcache.pipeline.distill.students import config_digest

    base = StudentConfig(name="s", model=StudentModelConfig(config={"model_type": "llama"}))
    # what checkpoints written before students had batch_tokens hold: the digest of the rest
    older = {k: v for k, v in config_to_dict(base).items() if k != "batch_tokens"}
    assert config_digest(base) == hashlib.sha256(json.dumps(older, sort_keys=True).encode()).hexdigest()[:16]
    digests = {config_digest(base), config_digest(dataclasses.replace(base, batch_tokens=512)),
               config_digest(dataclasses.replace(base, grad_accum=2))}
    assert len(digests) == 3


def test_misspelt_model_settings_and_types_are_named_with_the_likely_one(tokenizer_info):
    manifest = manifest_for(tokenizer_info)

    def build(**config):
        return build_student(student_cfg(config={**TINY, **config}), manifest=manifest, device=torch.device("cpu"),
                             seed=0)

    # a transformers config would keep hidden_sise as an attribute no model reads, and build the default width
    with pytest.raises(StudentError, match=r"model\.config\.hidden_sise: llama configs have no setting "
                                           r"'hidden_sise'; did you mean 'hidden_size'\?"):
        build(hidden_sise=64)
    with pytest.raises(StudentError, match=r"model\.config\.model_type: 'lama' is not a transformers model type; "
                                           r"did you mean 'llama'"):
        build(model_type="lama")
    with pytest.warns(UserWarning, match=r"model\.config\.zzz_marker: not a setting of llama configs"):
        student = build(zzz_marker=1)
    assert student.model.config.hidden_size == TINY["hidden_size"]
    build(rope_theta=5000.0, tie_word_embeddings=True)  # settings transformers converts or declares: accepted
