"""Packed student rows: no record attends to another, whichever way the model class needs it
(the probe itself: tests/pipeline/common/test_packed_attention.py)."""

import dataclasses

import numpy as np
import pytest
import torch

from logitcache.config import StudentConfig, StudentModelConfig
from logitcache.errors import StudentError
from logitcache.pipeline.common.packed_attention import packed_forward
from logitcache.pipeline.distill.collate import TokenPacker
from logitcache.pipeline.distill.students import build_student
from tests.factories import make_layout, make_template

VOCAB = 400
CPU = torch.device("cpu")
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 128}
_MHA = {k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}
FAMILIES = {
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "phi": _DECODER,
    "gemma": {**_DECODER, "head_dim": 8},
    "gemma2": {**_DECODER, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64,
               "final_logit_softcapping": None},
    "gpt_neox": _MHA,
    "biogpt": _MHA,
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 64, "n_positions": 128},
    "opt": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 64,
            "word_embed_proj_dim": 32, "max_position_embeddings": 128},
    "falcon": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "new_decoder_architecture": True, "num_kv_heads": 2},
    "mpt": {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 128},
}
EAGER_ONLY = {"gemma2", "mpt"}  # transformers has no SDPA attention for these
CASES = [(family, attn) for family in FAMILIES for attn in ("sdpa", "eager")
         if attn == "eager" or family not in EAGER_ONLY]
RECORD_LENGTHS = (5, 9, 4)  # packed into a row of 24: the last 6 slots are padding


def manifest():
    return make_template(make_layout("token_topk", k=4, vocab_size=VOCAB))


def student_for(family, attn, **config):
    settings = {"model_type": family, **FAMILIES[family], **_IDS, "attn_implementation": attn, **config}
    cfg = StudentConfig(name=family, model=StudentModelConfig(config=settings))
    return build_student(cfg, manifest=manifest(), device=CPU, seed=0)


def packed_batch():
    fields = ["record_id", "lang", "cursor", "input_ids", "context_length", "topk_ids", "topk_values"]
    record = dataclasses.make_dataclass("Record", fields)
    records = [record(i, "en", (0, 0, i, 3), (np.arange(n) * 13 + 7 * i) % (VOCAB - 4) + 4, 0,
                      np.zeros((n, 4), dtype=np.int64), np.zeros((n, 4), dtype=np.float32))
               for i, n in enumerate(RECORD_LENGTHS)]
    return records, TokenPacker(manifest().layout, rows=1, length=24, pad_id=0).collate(records)


def largest_gap_to_alone(model, *, mask_form):
    """Largest difference between a record's hidden states in the packed row and alone."""
    records, batch = packed_batch()
    with torch.no_grad():
        packed = packed_forward(model, batch.input_ids, batch.position_ids, mask_form=mask_form)[0]
        gaps, start = [], 0
        for rec in records:
            n = len(rec.input_ids)
            alone = packed_forward(model, torch.from_numpy(rec.input_ids)[None], torch.arange(n)[None],
                                   mask_form=mask_form)[0]
            gaps.append(float((packed[start:start + n] - alone).abs().max()))
            start += n
    return max(gaps)


@pytest.mark.parametrize(("family", "attn"), CASES, ids=[f"{f}-{a}" for f, a in CASES])
def test_each_record_of_a_packed_row_gets_the_states_it_has_alone(family, attn):
    student = student_for(family, attn)
    assert student.model.config._attn_implementation == attn
    assert student.model.training  # the probe gave the model its train mode back
    student.model.eval()
    with torch.no_grad():
        records, batch = packed_batch()
        packed = student.hidden_states(batch.input_ids, batch.position_ids)[0]
        start = 0
        for rec in records:
            n = len(rec.input_ids)
            alone = student.hidden_states(torch.from_numpy(rec.input_ids)[None], torch.arange(n)[None])[0]
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
    # the explicit mask is used exactly when the model would otherwise let records attend to each other
    leaks_without_mask = largest_gap_to_alone(student.model, mask_form=None) > 1e-3
    assert (student.packing_mask is not None) == leaks_without_mask


def _drop_packing_detection(monkeypatch, module, name="create_causal_mask"):
    """Make a model class build its causal mask as if its position ids did not restart."""
    original = getattr(module, name)

    def without_positions(*args, **kwargs):
        kwargs["position_ids"] = None
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, without_positions)


@pytest.mark.parametrize(("attn", "form"), [("sdpa", "bool"), ("eager", "additive")])
def test_a_model_that_ignores_restarting_positions_gets_a_block_mask(monkeypatch, attn, form):
    from transformers.models.llama import modeling_llama

    _drop_packing_detection(monkeypatch, modeling_llama)
    student = student_for("llama", attn)
    assert largest_gap_to_alone(student.model, mask_form=None) > 1e-2  # it does leak without the mask
    assert student.packing_mask == form
    assert largest_gap_to_alone(student.model, mask_form=student.packing_mask) < 1e-5


def test_a_model_that_no_mask_can_isolate_is_refused_with_its_class_named(monkeypatch):
    from transformers.models.llama import modeling_llama

    # a causal mask over the whole row, whatever the position ids or attention mask say
    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda *args, **kwargs: None)
    with pytest.raises(StudentError, match=r"students\[llama\]: LlamaForCausalLM lets the records packed into "
                                           r"one row attend to each other.*the bool mask does not stop it.*"
                                           r"Use another attn_implementation"):
        student_for("llama", "sdpa")


def test_a_leaking_sliding_window_model_is_refused_not_given_a_full_mask(monkeypatch):
    from transformers.models.mistral import modeling_mistral

    _drop_packing_detection(monkeypatch, modeling_mistral, "create_sliding_window_causal_mask")
    with pytest.raises(StudentError, match=r"MistralForCausalLM lets the records.*sliding-window attention "
                                           r"\(window 16\)"):
        student_for("mistral", "sdpa", sliding_window=16)
