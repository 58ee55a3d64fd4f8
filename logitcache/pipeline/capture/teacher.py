"""Loading the teacher and running its forward pass.

A teacher is any ``transformers`` model loaded with ``from_pretrained``: a causal LM (per-token
next-token distributions) or a sequence classifier (one class distribution per sequence).
:func:`load_teacher` turns ``TeacherConfig`` into a :class:`Teacher`, which also records what
the cache manifest needs to tell teachers and tokenizers apart (``identity``, ``tokenizer_info``).

**The split head.** A causal LM's plain forward, ``model(...).logits``, materialises logits for
every position of the batch at once: ``[B, L, V]`` in the model dtype, and the soft-label code
then wants them in float32. For a 150k-token vocabulary that is the largest tensor of the whole
forward. So the stage runs the model in two halves instead: :meth:`Teacher.hidden_states` (the
base model, ending after its final norm) gives ``[B, L, H]``, from which only the real (unpadded)
positions are kept, and :meth:`Teacher.head` (the output embedding) is applied to chunks of
``p`` positions, so that only ``[p, V]`` logits exist at a time and padding costs no head work.

This is only valid when the LM's logits *are* ``head(final hidden)``. Some architectures
post-process them (Gemma 2's final soft-capping, Cohere's ``logit_scale``, Granite's
``logits_scaling``). Each load therefore decides ``split_head_ok`` once: a config that names a
known post-processing fails at once, and otherwise :meth:`Teacher.check_split_head` compares
both paths on a short dummy batch (max abs difference <= 1e-4 in float32; a few bf16/fp16 ulps
of the largest logit in half precision). When the check fails, the stage must use the reference
:meth:`Teacher.logits` (full forward) instead.

Padding: batching needs a pad token. A tokenizer without one gets its eos token (or unk/bos)
as pad; positions are masked by ``attention_mask``, so the choice does not change labels. A
classifier whose config has no ``pad_token_id`` gets the tokenizer's, since transformers'
classifiers find each sequence's last real token through it. Fingerprints are computed before
these changes, so they describe the tokenizer as published.

Packed rows: stage one puts the windows of several documents into one row, with position ids
that restart at each window (:mod:`~logitcache.pipeline.capture.batches`). Whether a model keeps
such windows apart, by itself or with an explicit block mask, depends on its class and
attention implementation, so :meth:`Teacher.packed_rows` measures it once, at first use; a
teacher it refuses runs on padded rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from logitcache.config import TeacherConfig
from logitcache.errors import TeacherError
from logitcache.pipeline.common.hf_models import (
    base_model_of,
    logit_postprocessing,
    resolve_device,
    resolve_dtype,
    source_problem,
    tokenizer_fingerprints,
)
from logitcache.pipeline.common.packed_attention import block_causal_mask, choose_packing_mask

__all__ = ["PackedRows", "Teacher", "load_teacher"]

_TASK_OF_SUFFIX = {"ForCausalLM": "causal_lm", "LMHeadModel": "causal_lm",
                   "ForSequenceClassification": "sequence_classification"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_sha_memo: dict[tuple, str] = {}


@dataclass(frozen=True, kw_only=True)
class PackedRows:
    """What the packing probe found about a teacher (:meth:`Teacher.packed_rows`)."""

    ok: bool  # windows packed into one row stay apart
    mask_form: str | None = None  # None: the position ids keep them apart; else the block mask's form
    note: str = ""  # why windows are not packed, when not ok


@dataclass(kw_only=True)
class Teacher:
    """A loaded teacher: model, tokenizer and the facts a cache records about them."""

    model: Any  # transformers.PreTrainedModel, in eval mode on ``device``
    tokenizer: Any  # transformers.PreTrainedTokenizerBase, with a pad token
    task: str  # causal_lm | sequence_classification
    device: torch.device
    dtype: torch.dtype
    # causal_lm: width of the logits, which may exceed len(tokenizer) by padding rows;
    # sequence_classification: rows of the input embedding (the logits are num_classes wide)
    vocab_size: int
    num_classes: int  # sequence_classification only, else 0
    identity: dict[str, Any]
    tokenizer_info: dict[str, Any]
    split_head_ok: bool = False  # hidden_states + head reproduce logits (see module docstring)
    head_device: torch.device | None = None  # where the LM head runs (teacher.device_map); None: ``device``
    packing: PackedRows | None = None  # how windows share a row, once probed (packed_rows)

    @property
    def label_device(self) -> torch.device:
        """The device of the head's logits, where top-k, sampling and entropy run."""
        return self.head_device or self.device

    @property
    def pad_token_id(self) -> int:
        """The id that fills padded slots of a batch (masked, so any id works; 0 without one)."""
        pad = self.tokenizer.pad_token_id
        return 0 if pad is None else pad

    def _inputs(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}

    @torch.inference_mode()
    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Final hidden states ``[B, L, H]`` (after the final norm) from the base model."""
        output = base_model_of(self.model)(**self._inputs(input_ids, attention_mask), use_cache=False)
        return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    @torch.inference_mode()
    def head(self, hidden: Tensor) -> Tensor:
        """The LM head on ``[p, H]`` hidden states: logits ``[p, V]`` in the model dtype."""
        head = self.model.get_output_embeddings()
        if head is None:
            raise TeacherError(f"{type(self.model).__name__} has no LM head (output embeddings)")
        return head(hidden.to(self.label_device, self.dtype))

    @torch.inference_mode()
    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The plain full forward, ``model(...).logits``: the reference path."""
        return self.model(**self._inputs(input_ids, attention_mask), use_cache=False).logits

    def packed_rows(self) -> PackedRows:
        """Whether windows of several documents may share a forward row, and with which mask:
        probed at the first call (a few dozen tokens through the model), then kept."""
        if self.packing is None:
            self.packing = self._probe_packing()
        return self.packing

    def _probe_packing(self) -> PackedRows:
        if self.task != "causal_lm":
            return PackedRows(ok=False, note="a sequence classifier pools each row into one record")
        try:
            form = choose_packing_mask(self.model, device=self.device, autocast=contextlib.nullcontext,
                                       where="teacher", error=TeacherError)
        except TeacherError as refusal:
            return PackedRows(ok=False, note=str(refusal))
        return PackedRows(ok=True, mask_form=form)

    def _packed_inputs(self, input_ids: Tensor, position_ids: Tensor) -> dict[str, Tensor]:
        inputs = {"input_ids": input_ids.to(self.device), "position_ids": position_ids.to(self.device)}
        form = self.packed_rows().mask_form
        if form is not None:
            inputs["attention_mask"] = block_causal_mask(inputs["position_ids"], form=form, dtype=self.dtype)
        return inputs

    @torch.inference_mode()
    def packed_hidden_states(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """:meth:`hidden_states` of packed rows, whose ``position_ids`` restart at 0 for each
        window; each window attends only to itself (see :meth:`packed_rows`)."""
        output = base_model_of(self.model)(**self._packed_inputs(input_ids, position_ids), use_cache=False)
        return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    @torch.inference_mode()
    def packed_logits(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """:meth:`logits` of packed rows (as :meth:`packed_hidden_states`)."""
        return self.model(**self._packed_inputs(input_ids, position_ids), use_cache=False).logits

    def class_logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Sequence classification: float32 log-probabilities of the classes, ``[B, C]``."""
        if self.task != "sequence_classification":
            raise TeacherError(f"class_logprobs needs a sequence_classification teacher, this one is {self.task}")
        return torch.log_softmax(self.logits(input_ids, attention_mask).float(), dim=-1)

    def check_split_head(self) -> bool:
        """Whether hidden_states + head reproduce logits for this model (see module docstring)."""
        if self.task != "causal_lm" or logit_postprocessing(self.model.config) is not None:
            return False
        try:
            base_model_of(self.model)
        except TeacherError:
            return False
        real = max(2, min(len(self.tokenizer), self.vocab_size))
        input_ids = (torch.arange(16).reshape(2, 8) * 37 + 5) % real
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 5:] = 0  # right padding in the second row
        keep = attention_mask.bool()
        logits = self.logits(input_ids, attention_mask)
        reference = logits[keep.to(logits.device)].float()
        hidden = self.hidden_states(input_ids, attention_mask)
        split = self.head(hidden[keep.to(hidden.device)]).float()
        if split.shape != reference.shape:
            return False
        scale = max(1.0, reference.abs().max().item())
        tolerance = 1e-4 if self.dtype == torch.float32 else 2.0**-6 * scale
        return (split - reference).abs().max().item() <= tolerance












def _weights_sha256(directory: Path) -> str | None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _sha_memo:  # hashing a large teacher takes a while; once per process
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as stream:
                while block := stream.read(1 << 23):
                    digest.update(block)
        _sha_memo[key] = digest.hexdigest()
    return _sha_memo[key]




def _source(cfg: TeacherConfig) -> tuple[str, Path | None]:
    """The name to pass to from_pretrained, and the local directory when it is one."""
    problem = source_problem(cfg.model)
    if problem is not None:
        raise TeacherError(f"teacher.model: {problem}")
    local = Path(os.path.expanduser(cfg.model))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise TeacherError(f"teacher.model: {cfg.model!r} is a directory without config.json; "
                               "give a directory written by save_pretrained")
        return str(local), local
    return cfg.model, None


def _hub_failure(cfg: TeacherConfig, what: str, error: Exception) -> TeacherError:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") else ""
    revision = f" at revision {cfg.revision!r}" if cfg.revision else ""
    return TeacherError(
        f"teacher.model: could not load the {what} of {cfg.model!r}{revision}: no such local directory, "
        f"and as a hub name it needs network access{offline} or a copy in the local cache; "
        f"give a local path instead ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")


def _check_task(cfg: TeacherConfig, config: Any) -> None:
    for arch in getattr(config, "architectures", None) or ():
        kind = next((task for suffix, task in _TASK_OF_SUFFIX.items() if arch.endswith(suffix)), None)
        if kind is not None and kind != cfg.task:
            raise TeacherError(f"teacher.task: {cfg.model!r} is a {arch}, a {kind} model, but teacher.task is "
                               f"{cfg.task}; set teacher.task: {kind} (--set teacher.task={kind})")


def _placement(cfg: TeacherConfig) -> dict[str, Any]:
    """``from_pretrained``'s placement arguments for ``teacher.device_map`` (accelerate's)."""
    if cfg.device_map is None:
        return {}
    try:
        import accelerate  # noqa: F401  (transformers places the layers with it)
    except ImportError:
        raise TeacherError("teacher.device_map needs accelerate: pip install 'logitcache[hf]' "
                           "(or pip install accelerate)") from None
    return {"device_map": cfg.device_map}


def _placed_devices(cfg: TeacherConfig, model: Any) -> tuple[torch.device, torch.device]:
    """(where the inputs go, where the head runs) of a teacher placed by ``teacher.device_map``."""
    first = model.get_input_embeddings().weight.device
    head = model.get_output_embeddings() if cfg.task == "causal_lm" else None
    last = next(head.parameters()).device if head is not None else first
    for where in (first, last):
        if where.type == "meta":
            raise TeacherError(f"teacher.device_map {cfg.device_map!r} offloads part of {cfg.model!r} to disk, which "
                               "stage one does not run; give the teacher's devices more memory, or use a map without "
                               "offloading")
    return first, last


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """Load ``cfg.model`` for ``cfg.task`` on the resolved device and dtype; raise TeacherError
    (exit code 2) with what to do when it is missing, mismatched or unusable."""
    import transformers
    from packaging.version import Version
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    placement = _placement(cfg)
    name, local = _source(cfg)
    common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(name, **common)
        tokenizer = AutoTokenizer.from_pretrained(name, **common)
    except (OSError, ValueError) as error:
        if local is None:
            raise _hub_failure(cfg, "config or tokenizer", error) from None
        raise TeacherError(f"teacher.model: cannot load {cfg.model!r}: {error}") from None
    _check_task(cfg, config)
    auto = AutoModelForCausalLM if cfg.task == "causal_lm" else AutoModelForSequenceClassification
    dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        model, info = auto.from_pretrained(name, config=config, output_loading_info=True, **common,
                                           **{dtype_kwarg: dtype}, **placement)
    except ValueError as error:  # "Unrecognized configuration class ... for this kind of AutoModel"
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise TeacherError(f"teacher.task: {cfg.model!r} ({archs}) cannot be loaded as {cfg.task}; "
                           f"check teacher.task ({error})") from None
    except OSError as error:
        if local is None:
            raise _hub_failure(cfg, "weights", error) from None
        raise TeacherError(f"teacher.model: cannot load the weights of {cfg.model!r}: {error}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise TeacherError(f"teacher.model: {cfg.model!r} has no weights for {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} as {type(model).__name__}; they would be random. "
                           "Check teacher.task and that the checkpoint is complete")
    head_device = None
    if placement:
        device, head_device = _placed_devices(cfg, model)
        model.eval()
    else:
        model.eval().to(device)

    tokenizer_info = {"name_or_path": cfg.model, **tokenizer_fingerprints(tokenizer)}
    if tokenizer.pad_token is None:  # batching needs one; masked positions never reach a label
        fallback = next((t for t in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token) if t), None)
        if fallback is not None:
            tokenizer.pad_token = fallback
            tokenizer_info["pad_token_set_to"] = str(fallback)
    if cfg.task == "sequence_classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    embed_rows = model.get_input_embeddings().weight.shape[0]
    if cfg.task == "causal_lm":
        head = model.get_output_embeddings()
        vocab_size, num_classes = (head.weight.shape[0] if head is not None else model.config.vocab_size), 0
    else:
        vocab_size, num_classes = embed_rows, int(model.config.num_labels)
    if len(tokenizer) > min(embed_rows, vocab_size):
        raise TeacherError(f"teacher: the tokenizer of {cfg.model!r} has {len(tokenizer)} tokens but the model's "
                           f"vocabulary has {min(embed_rows, vocab_size)} rows, so token ids would be out of range; "
                           "use the tokenizer the model was trained with")

    identity = {
        "name_or_path": cfg.model, "revision": cfg.revision,
        "commit_hash": getattr(config, "_commit_hash", None),  # resolved hub commit, when known
        "weights_sha256": _weights_sha256(local) if local is not None else None,
        "dtype": str(dtype).removeprefix("torch."), "task": cfg.task, "model_type": config.model_type,
        "architecture": type(model).__name__, "num_parameters": model.num_parameters(),
    }
    teacher = Teacher(model=model, tokenizer=tokenizer, task=cfg.task, device=device, dtype=dtype,
                      vocab_size=int(vocab_size), num_classes=num_classes, identity=identity,
                      tokenizer_info=tokenizer_info, head_device=head_device)
    teacher.split_head_ok = teacher.check_split_head()
    return teacher
