"""Packed rows without attention across records: a probe of each model, and the mask for
those that need one.

Both stages pack several sequences into one row with position ids that restart at 0 for
each: stage one packs windows into the teacher's rows, stage two packs records into the
student's. Most ``transformers`` model classes read such rows as packed sequences and build a
block-diagonal causal mask from the position ids; some build their mask from an attention
mask alone (OPT, MPT and BioGPT, for example), and would let each record attend to the
records before it in its row, silently. Which classes keep records apart depends on the
installed ``transformers`` and the attention implementation, so it is measured once per
model, before it runs, rather than assumed: :func:`choose_packing_mask` runs the model on a
short packed row and on its last record alone, and when they differ tries an explicit
block-diagonal mask, in the forms models take.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from logitcache.errors import LogitcacheError, StudentError
from logitcache.pipeline.common.hf_models import base_model_of

__all__ = ["MASK_FORMS", "block_causal_mask", "choose_packing_mask", "packed_forward"]

#: Explicit masks, in the order they are tried: ``bool`` (True = may attend, what SDPA takes)
#: and ``additive`` (0 or the dtype's lowest value, added to the scores by eager attention).
MASK_FORMS = ("bool", "additive")

#: Largest relative gap (per position, in L2 norm) between the states of record B after two
#: different records A of the same length: both rows run through the same kernels, so a model
#: that keeps records apart gives equal states, and any gap is attention across records.
_SAME_SHAPE_TOLERANCE = 1e-3
#: Largest relative gap between record B packed and record B alone: these run in other shapes,
#: hence other kernels, which in bf16 differ by about 1e-2; misread position ids differ by far more.
_ALONE_TOLERANCE = 5e-2
_PROBE_LENGTHS = (24, 8)  # records A and B: a few dozen tokens, cheap on any student
_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, AssertionError)


def block_causal_mask(position_ids: Tensor, *, form: str, dtype: torch.dtype) -> Tensor:
    """The ``[B, 1, L, L]`` mask that lets each slot see itself and the earlier slots of its
    record (a record starts wherever the position ids do not go up by one, as transformers
    reads packed rows). ``bool`` is 1 byte per entry; ``additive`` is ``dtype``-wide."""
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    segment = starts.cumsum(-1)
    slots = torch.arange(position_ids.shape[-1], device=position_ids.device)
    allowed = (segment[:, :, None] == segment[:, None, :]) & (slots[None, :] <= slots[:, None])
    allowed = allowed[:, None]
    if form == "bool":
        return allowed
    if form == "additive":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"unknown mask form {form!r}; expected one of {MASK_FORMS}")


def packed_forward(model: Any, input_ids: Tensor, position_ids: Tensor, *, mask_form: str | None) -> Tensor:
    """Final hidden states ``[B, L, H]`` of the base model under ``model``'s head on packed
    rows; ``mask_form`` None passes no mask (the model keeps records apart by itself)."""
    extra = {}
    if mask_form is not None:
        dtype = model.get_input_embeddings().weight.dtype
        extra["attention_mask"] = block_causal_mask(position_ids, form=mask_form, dtype=dtype)
    output = base_model_of(model)(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def choose_packing_mask(model: Any, *, device: torch.device,
                        autocast: Callable[[], AbstractContextManager], where: str,
                        error: type[LogitcacheError] = StudentError) -> str | None:
    """How ``model`` must run on packed rows: None when it keeps records apart by itself, else
    the first of :data:`MASK_FORMS` with which it does. Raises ``error`` (naming ``where``)
    when neither works. ``model`` runs in eval mode without gradients (then gets its mode
    back), under ``autocast`` as in training, and the RNG is left as it was."""
    name = type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(device)), autocast():
            try:
                if _keeps_records_apart(model, device=device, mask_form=None):
                    return None
            except _ERRORS as problem:
                raise error(f"{where}: {name} cannot run on packed rows (input ids and position ids): "
                            f"{type(problem).__name__}: {problem}") from None
            window = _sliding_window(model)
            if window is not None:
                raise error(_refusal(where, name, f"its sliding-window attention (window {window}) cannot take "
                                                  "one block mask for all layers"))
            problems = []
            for form in MASK_FORMS:
                try:
                    if _keeps_records_apart(model, device=device, mask_form=form):
                        return form
                    problems.append(f"the {form} mask does not stop it")
                except _ERRORS as problem:
                    problems.append(f"it does not take the {form} mask ({type(problem).__name__}: {problem})")
            raise error(_refusal(where, name, "; ".join(problems)))
    finally:
        model.train(was_training)


def _keeps_records_apart(model: Any, *, device: torch.device, mask_form: str | None) -> bool:
    """Run record B after record A, after another record A' and alone, and compare B's states."""
    vocab = model.get_input_embeddings().num_embeddings
    first, last = _PROBE_LENGTHS
    record_a, other_a, record_b = (_probe_tokens(n, vocab=vocab, salt=salt)
                                   for n, salt in ((first, 1), (first, 2), (last, 3)))
    rows = torch.stack([torch.cat([record_a, record_b]), torch.cat([other_a, record_b])]).to(device)
    positions = torch.cat([torch.arange(first), torch.arange(last)]).expand(2, -1).to(device)
    packed = packed_forward(model, rows, positions, mask_form=mask_form)[:, first:].float()
    alone = packed_forward(model, record_b[None].to(device), torch.arange(last, device=device)[None],
                           mask_form=mask_form)[0].float()
    return (_relative_gap(packed[0], packed[1]) <= _SAME_SHAPE_TOLERANCE
            and _relative_gap(packed[0], alone) <= _ALONE_TOLERANCE)


def _probe_tokens(length: int, *, vocab: int, salt: int) -> Tensor:
    """Fixed token ids spread over the vocabulary, different for each ``salt``."""
    step = 2 * salt + 7
    return (torch.arange(length) * step + 11 * salt + 4) % vocab


def _relative_gap(got: Tensor, want: Tensor) -> float:
    """Largest per-position ``|got - want| / |want|`` (L2 over the hidden size)."""
    scale = want.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return float(((got - want).norm(dim=-1) / scale).max())


def _sliding_window(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "sliding_window", None)


def _cuda_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _refusal(where: str, name: str, why: str) -> str:
    return (f"{where}: {name} lets the records packed into one row attend to each other (it does not read "
            f"packed rows from position ids), and no explicit mask fixes that: {why}. Use another "
            "attn_implementation (sdpa or eager) in the model's config, another model type, or a "
            "transformers release whose causal mask reads packed position ids")
