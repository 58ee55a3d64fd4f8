"""Students: build or load each student model, check it can learn from this cache, and run it.

A student is a ``transformers`` model built from a config (fresh weights, seeded) or loaded
with ``from_pretrained``. Before any training it is checked against the cache:

- token caches: the stored ids are the teacher tokenizer's, so the student must read the
  same vocabulary. A student with its own tokenizer is compared by vocabulary fingerprint
  (the token-to-id mapping) and refused with the two fingerprints when they differ. A
  student without a tokenizer reads the cached ids as they are. Model widths that differ
  only by padding rows are fine: the head must cover the tokenizer's real tokens, and
  logits are cut (or padded with a large negative logit) to the teacher's width.
- classification caches: the class counts must agree; the student reads either the cached
  tokens (same tokenizer) or its own text column (any tokenizer, see ``text_column``).

Running a causal-LM student returns final hidden states, not logits: the loss applies the
LM head a chunk of positions at a time, so ``[B, L, V]`` logits never exist for a batch. Its
rows are packed; a probe at build time makes sure no record attends to another (see
:mod:`~logitcache.pipeline.common.packed_attention`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from logitcache.config import StudentConfig
from logitcache.errors import StudentError, TeacherError
from logitcache.pipeline.common.hf_models import (
    base_model_of,
    logit_postprocessing,
    source_problem,
    tokenizer_fingerprints,
)
from logitcache.pipeline.common.packed_attention import choose_packing_mask, packed_forward
from logitcache.storage_schemas.manifest import Manifest

#: Logit given to the teacher-width columns a narrower student head lacks (padding rows).
_MISSING_ROW_LOGIT = -1.0e4


@dataclass(kw_only=True)
class Student:
    """A student model on its device, ready to run on batches of one cache."""

    name: str
    cfg: StudentConfig
    model: Any  # transformers PreTrainedModel, in train mode
    tokenizer: Any | None  # None: the student reads the cache's token ids
    task: str  # causal_lm | sequence_classification
    device: torch.device
    target_width: int  # the teacher's vocabulary (causal_lm) or class count
    pad_token_id: int  # fills padded slots of this student's inputs
    reads_text: bool = False  # classification: tokenizes its own text column
    packing_mask: str | None = None  # causal_lm: the explicit mask its packed rows need; None: none

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on a GPU; full precision on the CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def hidden_states(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Final hidden states ``[B, L, H]`` of packed rows, where the position ids mark where
        records start; no record attends to another (with :attr:`packing_mask` where the model
        needs one)."""
        return packed_forward(self.model, input_ids, position_ids, mask_form=self.packing_mask)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits ``[p, target_width]`` of ``[p, H]`` hidden states."""
        logits = self.model.get_output_embeddings()(hidden)
        width = logits.shape[-1]
        if width > self.target_width:
            return logits[..., : self.target_width]
        if width < self.target_width:
            return torch.nn.functional.pad(logits, (0, self.target_width - width), value=_MISSING_ROW_LOGIT)
        return logits

    def class_logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def save(self, directory: str | os.PathLike[str]) -> None:
        """``save_pretrained`` of the model (and its tokenizer when it has its own)."""
        self.model.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)


def student_seed(seed: int, name: str) -> int:
    """Initialisation seed of one student: stable, and different between students."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:4], "little")


def build_student(cfg: StudentConfig, *, manifest: Manifest, device: torch.device, seed: int) -> Student:
    """Build or load ``cfg``'s model for the cache described by ``manifest`` and check that it fits."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    layout = manifest.layout
    task = "causal_lm" if layout.is_token_level else "sequence_classification"
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    where = f"students[{cfg.name}]"
    if cfg.text_column is not None and task != "sequence_classification":
        raise StudentError(f"{where}.text_column: only classification caches can be joined to another text "
                           f"column; this cache holds {layout.kind} labels, which are tied to the teacher's tokens")
    if cfg.model.config is not None:
        settings = dict(cfg.model.config)
        model_type = settings.pop("model_type")
        tokenizer = _load_tokenizer(cfg.tokenizer, where) if cfg.tokenizer else None
        if cfg.text_column is not None and tokenizer is not None:
            settings.setdefault("vocab_size", len(tokenizer))
        else:
            settings.setdefault("vocab_size", layout.vocab_size)
        if task == "sequence_classification":
            settings.setdefault("num_labels", layout.num_classes)
        _check_model_type(model_type, where)
        try:
            config = AutoConfig.for_model(model_type, **settings)
        except (ValueError, KeyError, TypeError) as error:
            raise StudentError(f"{where}.model.config: not a valid transformers config: {error}") from None
        _check_config_keys(config, cfg.model.config, where)
        torch.manual_seed(student_seed(seed, cfg.name))
        try:
            model = auto.from_config(config)
        except ValueError as error:
            raise StudentError(f"{where}.model.config: {model_type} cannot be built for {task}: {error}") from None
    else:
        path = os.path.expanduser(cfg.model.path)
        problem = source_problem(cfg.model.path)
        if problem is not None:
            raise StudentError(f"{where}.model.path: {problem}")
        try:
            model = auto.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise StudentError(f"{where}.model.path: cannot load {cfg.model.path!r} as {task}: {error}") from None
        tokenizer = _load_tokenizer(cfg.tokenizer or path, where, required=cfg.tokenizer is not None)
    model.to(device).train()
    reads_text = cfg.text_column is not None
    pad_id = _tokenizer_pad_id(tokenizer) if reads_text and tokenizer is not None else cache_pad_id(manifest)
    if task == "sequence_classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # the classifier pools the last slot that is not padding

    student = Student(name=cfg.name, cfg=cfg, model=model, tokenizer=tokenizer, task=task, device=device,
                      target_width=layout.vocab_size if task == "causal_lm" else layout.num_classes,
                      pad_token_id=pad_id, reads_text=reads_text)
    if task == "causal_lm":
        _check_causal_student(student, manifest, where)
        student.packing_mask = choose_packing_mask(model, device=device, autocast=student.autocast, where=where)
    else:
        _check_classifier_student(student, manifest, where)
    return student


def _check_model_type(model_type: str, where: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    known = sorted(CONFIG_MAPPING.keys())
    if model_type in known:
        return
    close = difflib.get_close_matches(model_type, known, n=3)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "e.g. llama, qwen2, gpt2 or bert"
    raise StudentError(f"{where}.model.config.model_type: {model_type!r} is not a transformers model type; {hint}")


def _check_config_keys(config: Any, given: dict[str, Any], where: str) -> None:
    """Keys of a student's ``model.config`` that its config class has no setting for: a
    transformers config keeps any keyword as an extra attribute, which its model never reads
    (``hidden_sise: 64`` would leave the default width). One close to a real setting is an
    error that names it; any other is warned about (a model may read an extra attribute)."""
    cls = type(config)
    if not dataclasses.is_dataclass(cls):  # transformers < 5: the settings are not declared as fields
        return
    known = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "attribute_map", {}))
    for key in (k for k in given if k != "model_type" and k not in known and k in vars(config)):
        close = difflib.get_close_matches(key, sorted(k for k in known if not k.startswith("_")), n=1)
        if close:
            raise StudentError(f"{where}.model.config.{key}: {config.model_type} configs have no setting {key!r}; "
                               f"did you mean {close[0]!r}?")
        warnings.warn(f"{where}.model.config.{key}: not a setting of {config.model_type} configs; it is kept as "
                      "an extra attribute, which the model may not read", stacklevel=2)


def cache_pad_id(manifest: Manifest) -> int:
    """The pad id the teacher used for this cache's tokens (0 when it had none)."""
    special = manifest.tokenizer.get("special_tokens") or {}
    if "pad_token" in special:
        return int(special["pad_token"][1])
    fallback = manifest.tokenizer.get("pad_token_set_to")
    for token, token_id in special.values():
        if fallback is not None and token == fallback:
            return int(token_id)
    return 0


def shared_pad_id(students: Iterable[Student]) -> int:
    """The pad id of batches shared by ``students``: the students reading the cache's tokens
    share the cache's pad id (those with their own texts pad their own inputs)."""
    pads = {s.pad_token_id for s in students if not s.reads_text}
    return min(pads) if pads else 0


def _tokenizer_pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _load_tokenizer(name: str, where: str, *, required: bool = True) -> Any | None:
    from transformers import AutoTokenizer

    local = Path(os.path.expanduser(name))
    if not required and not (local / "tokenizer_config.json").is_file() and not (local / "tokenizer.json").is_file():
        return None
    problem = source_problem(name)
    if problem is not None:
        raise StudentError(f"{where}.tokenizer: {problem}")
    try:
        return AutoTokenizer.from_pretrained(os.fspath(local) if local.exists() else name)
    except (OSError, ValueError) as error:
        raise StudentError(f"{where}.tokenizer: cannot load a tokenizer from {name!r}: {error}") from None


def _check_causal_student(student: Student, manifest: Manifest, where: str) -> None:
    cached = manifest.tokenizer
    real_tokens = int(cached.get("vocab_size") or manifest.layout.vocab_size)
    if student.tokenizer is not None:
        mine = tokenizer_fingerprints(student.tokenizer)
        if mine["vocab_fingerprint"] != cached.get("vocab_fingerprint"):
            raise StudentError(
                f"{where}: the student's tokenizer ({len(student.tokenizer)} tokens, vocab fingerprint "
                f"{mine['vocab_fingerprint'][:12]}) is not the one the cache was built with "
                f"({cached.get('name_or_path')}, {real_tokens} tokens, vocab fingerprint "
                f"{str(cached.get('vocab_fingerprint'))[:12]}); the cached token ids would mean other tokens. "
                "Use the teacher's tokenizer, or build a cache with this one")
    head = student.model.get_output_embeddings()
    if head is None:
        raise StudentError(f"{where}: {type(student.model).__name__} has no LM head (output embeddings)")
    width = student.model.get_input_embeddings().num_embeddings
    if width < real_tokens or head.weight.shape[0] < real_tokens:
        raise StudentError(
            f"{where}: the student's vocabulary ({min(width, head.weight.shape[0])} rows) is smaller than the "
            f"cache's tokenizer ({real_tokens} tokens); set vocab_size >= {manifest.layout.vocab_size} "
            "in the student's config (or leave it out to take the teacher's)")
    post = logit_postprocessing(student.model.config)
    if post is not None:
        raise StudentError(f"{where}: students whose logits are post-processed after the head ({post}) "
                           "are not supported; the chunked loss applies the head itself")
    try:
        base_model_of(student.model)
    except TeacherError as error:
        raise StudentError(f"{where}: {error}") from None


def _check_classifier_student(student: Student, manifest: Manifest, where: str) -> None:
    classes = student.model.config.num_labels
    if classes != manifest.layout.num_classes:
        raise StudentError(f"{where}: the student classifies into {classes} classes, the cache holds "
                           f"{manifest.layout.num_classes}; set num_labels: {manifest.layout.num_classes}")
    if student.reads_text:
        if student.tokenizer is None:
            raise StudentError(f"{where}.tokenizer: a student with text_column needs its own tokenizer "
                               "(give tokenizer:, or a model path that has one)")
        return
    if student.tokenizer is not None:
        mine = tokenizer_fingerprints(student.tokenizer)["vocab_fingerprint"]
        if mine != manifest.tokenizer.get("vocab_fingerprint"):
            raise StudentError(f"{where}: the student's tokenizer differs from the cache's; to train on "
                               "your own tokenization set text_column (the corpus column to read)")
    width = student.model.get_input_embeddings().num_embeddings
    if width < int(manifest.tokenizer.get("vocab_size") or 0):
        raise StudentError(f"{where}: the student's embedding ({width} rows) is smaller than the cache's "
                           f"tokenizer ({manifest.tokenizer.get('vocab_size')} tokens)")


def describe_student(student: Student) -> dict[str, Any]:
    """What a report says about a student."""
    return {"parameters": student.parameters, "model_type": student.model.config.model_type,
            "loss": student.cfg.loss.kind, "alpha": student.cfg.loss.alpha,
            "temperature": student.cfg.loss.temperature, "tail": student.cfg.loss.tail,
            "lr": student.cfg.optimizer.lr, "batch_tokens": student.cfg.batch_tokens or "shared",
            "grad_accum": student.cfg.grad_accum, "text_column": student.cfg.text_column}


def config_digest(cfg: StudentConfig) -> str:
    """A digest of everything that defines a student's training, to refuse resuming another one."""
    from logitcache.config import config_to_dict

    settings = config_to_dict(cfg)
    for name in _ADDED_SETTINGS:
        if settings.get(name) is None:
            settings.pop(name, None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: Student settings added after checkpoints existed; left out of the digest while unset, so that
#: those checkpoints still resume.
_ADDED_SETTINGS = ("batch_tokens",)
