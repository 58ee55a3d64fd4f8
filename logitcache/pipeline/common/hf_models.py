"""What both stages need to know about a Hugging Face model: where its name points (a local
directory or a hub name), the device and dtype it runs in, the module under its head, whether
it changes logits after the head, and the fingerprints that tell tokenizers apart.

Stage one loads the teacher with these (:mod:`~logitcache.pipeline.capture.teacher`) and stage
two its students (:mod:`~logitcache.pipeline.distill.students`), so that a student is checked
against the cache with the very fingerprint the build recorded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from logitcache.errors import TeacherError
from logitcache.storage_schemas.fingerprint import fingerprint

__all__ = ["base_model_of", "logit_postprocessing", "resolve_device", "resolve_dtype", "source_problem",
           "tokenizer_fingerprints"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# config attributes with which an architecture changes logits after the LM head (value, neutral)
_LOGIT_POSTPROCESSING = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def base_model_of(model: Any) -> Any:
    """The module whose output is the final hidden state (Llama/Qwen2/Mistral .model,
    GPT-2 .transformer, GPT-NeoX .gpt_neox, multimodal wrappers' language model)."""
    try:
        base = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        base = None
    if base is None or base is model:
        base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise TeacherError(f"{type(model).__name__}: cannot find its base model for the split head")
    return base


def logit_postprocessing(config: Any) -> str | None:
    for name, neutral in _LOGIT_POSTPROCESSING.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            return f"{name}={value}"
    return None


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; other names are checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise TeacherError(f"teacher.device: {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TeacherError(f"teacher.device: {name!r} but no CUDA GPU is available here; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise TeacherError(f"teacher.device: {name!r} but this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise TeacherError(f"teacher.device: {name!r} but MPS is not available here; use cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if name not in _DTYPES:
        raise TeacherError(f"teacher.dtype: must be one of auto, {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def tokenizer_fingerprints(tokenizer: Any) -> dict[str, Any]:
    """Hashes that tell tokenizers apart: ``fingerprint`` (everything that changes encoding) and
    ``vocab_fingerprint`` (the token-id mapping only, which is what stored ids depend on)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    special = {name: getattr(tokenizer, name, None) for name in _SPECIAL_NAMES}
    special = {name: str(token) for name, token in special.items() if token is not None}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for transient in ("padding", "truncation"):  # set by calls with padding=/truncation=
            state.pop(transient, None)
        full = fingerprint(state)
    else:  # a slow (Python / sentencepiece) tokenizer
        full = fingerprint({"class": type(tokenizer).__name__, "vocab": vocab, "special": special})
    return {"fingerprint": full, "vocab_fingerprint": fingerprint(vocab), "vocab_size": len(tokenizer),
            "special_tokens": {name: [token, tokenizer.convert_tokens_to_ids(token)]
                               for name, token in special.items()}}


def source_problem(name: str) -> str | None:
    """Why ``name``, a model or tokenizer to load, is neither a local directory nor a hub
    name; None when it may be either. A missing path whose parent is a local directory (a
    mistyped ``runs/mdoel``) is taken for a local path, not sent to the hub."""
    local = Path(os.path.expanduser(name))
    if local.is_dir():
        return None
    if local.exists():
        return f"{name!r} is a file; give the directory written by save_pretrained"
    if not _HUB_ID.fullmatch(name) or ".." in name:
        return f"{name!r} does not exist; give a local directory or a hub name"
    if local.parent != Path(".") and local.parent.is_dir():
        return (f"{name!r} does not exist, and it is taken for a local path since {str(local.parent)!r} "
                "is a local directory; check the path")
    return None
