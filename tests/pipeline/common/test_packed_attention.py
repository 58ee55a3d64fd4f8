"""The packing probe and block masks, on plain ``transformers`` models (the students built on
them: tests/pipeline/distill/test_packing_isolation.py; the teacher: tests/pipeline/capture/test_packed_capture.py)."""

import contextlib

import pytest
import torch

from logitcache.errors import StudentError, TeacherError
from logitcache.pipeline.common.packed_attention import block_causal_mask, choose_packing_mask

VOCAB = 400
CPU = torch.device("cpu")
_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_DECODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 128}


def tiny_llama(**config):
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=VOCAB, **_DECODER, **_IDS,
                                                                 **config))


def test_a_model_that_cannot_take_position_ids_is_refused():
    model = tiny_llama()
    model.model.forward = lambda input_ids=None, attention_mask=None, use_cache=None: None  # no position_ids
    with pytest.raises(StudentError, match=r"s: LlamaForCausalLM cannot run on packed rows.*TypeError"):
        choose_packing_mask(model, device=CPU, autocast=contextlib.nullcontext, where="s")


def test_the_probe_leaves_dropout_rng_and_train_mode_alone():
    model = tiny_llama(attention_dropout=0.5).train()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    # with dropout active the same record would differ between rows: isolation holds only in eval mode
    assert choose_packing_mask(model, device=CPU, autocast=contextlib.nullcontext, where="s") is None
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), state)


def test_block_causal_masks_keep_each_record_and_its_past():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    mask = block_causal_mask(positions, form="bool", dtype=torch.float32)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    first = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                          [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], first)
    assert torch.equal(mask[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    additive = block_causal_mask(positions, form="additive", dtype=torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive[0, 0] == 0, first)
    assert bool((additive[0, 0][~first] == torch.finfo(torch.bfloat16).min).all())


def test_the_refusal_is_raised_as_the_callers_error(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama, "create_causal_mask", lambda *args, **kwargs: None)
    with pytest.raises(TeacherError, match=r"teacher: LlamaForCausalLM lets the records packed into one row"):
        choose_packing_mask(tiny_llama(), device=CPU, autocast=contextlib.nullcontext, where="teacher",
                            error=TeacherError)
