"""Train students from a cache with Hugging Face's ``transformers.Trainer``, and so with
accelerate, DDP, FSDP or DeepSpeed as TrainingArguments configure them.

- :class:`CacheBatches`: the packed batches ``logitcache train`` reads (records laid into
  rows of the cache's window length, position ids restarting per record) as dicts of
  tensors a Trainer moves to its device: ``input_ids``, ``position_ids``, ``labels`` (the
  Hugging Face convention, unshifted, -100 where there is no next token), ``label_mask``
  (the slots with a teacher label), the teacher's ``teacher_topk_ids`` /
  ``teacher_topk_logprobs`` and/or ``teacher_sample_ids`` / ``teacher_sample_counts``,
  ``teacher_entropy`` where stored, and ``cursors`` (where each record came from, for exact
  resume). Under torchrun each process reads its own part of the cache.
- :class:`DistillationTrainer`: a Trainer whose loss is logitcache's (every divergence, tail
  treatment, temperature, alpha and sampled kind), taken from the student's final hidden
  states through its head a chunk of positions at a time, so ``[B, L, V]`` logits never
  exist. Under FSDP or DeepSpeed, whose sharded head cannot run outside the model's forward,
  the model's own logits are used instead. Every checkpoint also holds the reader's
  position (``logitcache_reader.json``) and a resumed run continues from it: the batches
  after a resume are those an uninterrupted run reads, without re-reading the ones before.
- :func:`logitcache_optimizer`: the AdamW and learning-rate schedule ``logitcache train``
  uses, for ``Trainer(optimizers=...)``.

The batch size is ``CacheBatches(batch_tokens=...)``, not ``per_device_train_batch_size``;
set ``max_steps``, since the stream of batches has no end.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from logitcache.config import JobConfig, LossConfig, OptimizerConfig
from logitcache.errors import StudentError
from logitcache.pipeline.common.packed_attention import block_causal_mask, choose_packing_mask
from logitcache.pipeline.distill.collate import PackedBatches, TokenBatch, TokenPacker, rows_for
from logitcache.pipeline.distill.dataset import CacheDataset
from logitcache.pipeline.distill.losses import IGNORE_INDEX, check_loss_supported
from logitcache.pipeline.distill.training import lr_factor, make_optimizer, packed_distillation_loss
from logitcache.storage_schemas.location import CacheLocation
from logitcache.storage_schemas.shard_reader import CacheReader

__all__ = ["CacheBatches", "DistillationTrainer", "READER_STATE_FILE", "batch_features", "collate_batches",
           "logitcache_optimizer", "loss_targets"]

#: the reader's position, saved in every checkpoint folder of a DistillationTrainer
READER_STATE_FILE = "logitcache_reader.json"

_TEACHER_FIELDS = {"topk_ids": "teacher_topk_ids", "topk_logprobs": "teacher_topk_logprobs",
                   "sample_ids": "teacher_sample_ids", "sample_counts": "teacher_sample_counts",
                   "entropy": "teacher_entropy", "target_logprob": "teacher_target_logprob"}


def batch_features(batch: TokenBatch) -> dict[str, Tensor]:
    """A packed batch as the dict of tensors a Trainer (or any loop) takes."""
    batch = batch.decoded()
    labels = torch.full_like(batch.hard_targets, IGNORE_INDEX)
    labels[:, 1:] = batch.hard_targets[:, :-1]  # unshifted: labels[t] is the target of position t - 1
    out = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "labels": labels,
           "label_mask": batch.label_mask,
           "cursors": torch.tensor(batch.cursors, dtype=torch.int64).reshape(-1, 4)}
    for name, key in _TEACHER_FIELDS.items():
        value = getattr(batch, name)
        if value is not None:
            out[key] = value
    return out


def collate_batches(features: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Several batches of :func:`batch_features` as one (their rows one after another), for a
    DataLoader with a batch size."""
    if len(features) == 1:
        return dict(features[0])
    return {key: torch.cat([f[key] for f in features]) for key in features[0]}


def loss_targets(features: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
    """The keyword arguments of :func:`~logitcache.pipeline.distill.training.packed_distillation_loss`
    that come from a batch of :func:`batch_features` (on whatever device its tensors are)."""
    return {"label_mask": features["label_mask"], "hard_targets": hard_targets_of(features["labels"]),
            **{name: features.get(key) for name, key in _TEACHER_FIELDS.items() if name != "target_logprob"}}


def hard_targets_of(labels: Tensor) -> Tensor:
    """The next-token target of each slot from unshifted ``labels`` (-100: none)."""
    hard = torch.full_like(labels, IGNORE_INDEX)
    hard[:, :-1] = labels[:, 1:]
    return hard


class CacheBatches(torch.utils.data.IterableDataset):
    """The training split of a token-level cache as an endless stream of packed batches
    (:func:`batch_features`), in the order ``logitcache train`` reads them for the same
    settings (:meth:`for_job` takes them from a job config)."""

    def __init__(self, cache: str, *, batch_tokens: int, pad_id: int = 0, length: int | None = None,
                 seed: int = 0, shuffle_buffer: int = 4096, held_out_fraction: float = 0.0,
                 languages: list[str] | None = None, lang_alpha: float = 1.0, lanes: int | None = None,
                 verify: bool = True, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        reader = CacheReader(cache)
        layout = reader.manifest.layout
        if not layout.is_token_level:
            raise StudentError(f"{cache} holds class distributions ({layout.kind}); CacheBatches packs token-level "
                               "caches (train classifiers with `logitcache train`)")
        if not reader.manifest.shards:
            raise StudentError(f"{cache} has no committed shards yet; run `logitcache build` first")
        self.cache, self.layout = cache, layout
        self.length = int(length or reader.manifest.windows.get("max_length"))
        self.packer = TokenPacker(layout, rows=rows_for(batch_tokens, self.length), length=self.length,
                                  pad_id=pad_id, decode=True)
        self._options = {"seed": seed, "shuffle_buffer": shuffle_buffer, "held_out_fraction": held_out_fraction,
                         "languages": languages, "lang_alpha": lang_alpha, "lanes": lanes, "verify": verify}
        self.dataset = self._dataset(rank=rank, world_size=world_size)

    @classmethod
    def for_job(cls, cfg: JobConfig, *, pad_id: int = 0, **overrides: Any) -> CacheBatches:
        """The batches of ``cfg``'s cache with its train and eval settings, as ``logitcache
        train`` would read them for students whose pad id is ``pad_id``."""
        train = cfg.train
        options = {"batch_tokens": train.batch_tokens, "seed": train.seed, "shuffle_buffer": train.shuffle_buffer,
                   "held_out_fraction": cfg.eval.held_out_fraction, "languages": train.languages,
                   "lang_alpha": train.lang_alpha, "lanes": train.lanes,
                   "verify": train.on_corrupt_shard == "stop", "pad_id": pad_id, **overrides}
        return cls(cfg.cache, **options)

    def _dataset(self, *, rank: int | None, world_size: int | None) -> CacheDataset:
        options = self._options
        return CacheDataset(self.cache, seed=options["seed"], epochs=None, shuffle_buffer=options["shuffle_buffer"],
                            split="train", held_out_fraction=options["held_out_fraction"],
                            languages=options["languages"], lang_alpha=options["lang_alpha"],
                            rank=rank, world_size=world_size, verify=options["verify"], lanes=options["lanes"])

    def shard(self, *, rank: int, world_size: int) -> None:
        """Read process ``rank``'s part of ``world_size`` (before any batch is read)."""
        if (self.dataset.rank, self.dataset.world_size) != (rank, world_size):
            self.dataset = self._dataset(rank=rank, world_size=world_size)

    def __iter__(self):
        if self.dataset.own_windows == 0:
            raise StudentError(
                f"process {self.dataset.rank} of {self.dataset.world_size} has no part of {self.cache} to read: the "
                "cache is read in windows of about shuffle_buffer records, dealt to the processes, and there are "
                "fewer windows than processes; use a smaller shuffle_buffer or fewer processes")
        if self.dataset.records_per_epoch() == 0:
            raise StudentError(f"the training split of {self.cache} is empty (every record is held out or filtered "
                               "out by languages); lower held_out_fraction or widen the filter")
        for batch in PackedBatches(self.dataset, self.packer, slots=0):
            yield batch_features(batch)

    def observe(self, cursors: Tensor | Any) -> None:
        """Say that the training loop consumed the batch with these ``cursors`` (once per batch,
        in order), so that :meth:`state_dict` resumes after it."""
        self.dataset.observe(cursors.cpu().numpy() if isinstance(cursors, Tensor) else cursors)

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)


def logitcache_optimizer(model: torch.nn.Module, cfg: OptimizerConfig | Mapping[str, Any] | None = None, *,
                         total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay on 1-D parameters) and the warmup + cosine/linear/constant
    schedule to 10% of the peak that ``logitcache train`` uses, for ``Trainer(optimizers=...)``."""
    cfg = cfg if isinstance(cfg, OptimizerConfig) else OptimizerConfig(**dict(cfg or {}))
    optimizer = make_optimizer(model, cfg)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg=cfg, total_steps=total_steps))


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that trains a causal LM on a :class:`CacheBatches` stream
    with logitcache's distillation loss ``loss`` (a LossConfig or its fields as a dict; by
    default forward KL, T 1, alpha 0.5, tail bucket). ``keep_losses`` records every
    micro-batch's total, kd and ce in :attr:`losses`. ``model_logits`` (default: under FSDP
    or DeepSpeed) feeds the model's own logits to the loss instead of applying the head a
    chunk at a time. See the module docstring."""

    loss_is_scaled_for_ga = False  # the loss is a mean per batch: Trainer divides it by the accumulation

    def __init__(self, *args: Any, loss: LossConfig | Mapping[str, Any] | None = None, keep_losses: bool = False,
                 model_logits: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the model's own [B, L, V] logits feed the loss, not a chunked head: where the head is sharded
        self.model_logits = (self.is_fsdp_enabled or self.is_deepspeed_enabled) if model_logits is None else model_logits
        if not isinstance(self.train_dataset, CacheBatches):
            raise StudentError("DistillationTrainer trains from a cache: pass train_dataset=CacheBatches(CACHE, ...)")
        self.distillation = loss if isinstance(loss, LossConfig) else LossConfig(**dict(loss or {}))
        check_loss_supported(self.distillation, self.train_dataset.layout.kind)
        model = self.accelerator.unwrap_model(self.model)
        self.vocab_size = self.train_dataset.layout.vocab_size
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < self.vocab_size:
            raise StudentError(f"{type(model).__name__} has {rows} output rows, fewer than the cache's vocabulary "
                               f"({self.vocab_size} tokens); give the student a vocab_size of at least that")
        self.train_dataset.shard(rank=self.args.process_index, world_size=self.args.world_size)
        self.packing_mask = choose_packing_mask(model, device=self.args.device, autocast=contextlib.nullcontext,
                                                where=type(model).__name__)
        self.keep_losses = keep_losses
        self.losses: list[dict[str, float]] = []
        self._window = {"kd": 0.0, "ce": 0.0, "batches": 0}

    # ---- data

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The batches as they are (each item is a whole packed batch), in this process's part."""
        workers = self.args.dataloader_num_workers
        self.train_dataset.dataset.lanes_for(workers)
        return torch.utils.data.DataLoader(
            self.train_dataset, batch_size=None, num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory and self.args.device.type == "cuda",
            persistent_workers=workers > 0 and self.args.dataloader_persistent_workers)

    def get_resumed_dataloader(self, dataloader: torch.utils.data.DataLoader,
                               num_batches: int) -> torch.utils.data.DataLoader:
        """No batch is skipped by reading it: the reader resumed from the checkpoint's position."""
        return dataloader

    # ---- loss

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        if model.training and "cursors" in inputs:
            self.train_dataset.observe(inputs["cursors"])
        extra: dict[str, Any] = {}
        if self.packing_mask is not None:
            dtype = self.accelerator.unwrap_model(model).get_input_embeddings().weight.dtype
            extra["attention_mask"] = block_causal_mask(inputs["position_ids"], form=self.packing_mask, dtype=dtype)
        if self.model_logits:
            outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False,
                            **extra)
            states, head = outputs.logits, _as_logits
        else:  # only one position's logits from the forward; the loss runs the head chunk by chunk
            outputs = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False,
                            output_hidden_states=True, logits_to_keep=1, **extra)
            states, head = outputs.hidden_states[-1], self.accelerator.unwrap_model(model).get_output_embeddings()
        out = packed_distillation_loss(states, head, **loss_targets(inputs), loss=self.distillation,
                                       vocab_size=self.vocab_size)
        if model.training:
            self._note(total=float(out.total.detach()), kd=float(out.kd_for_log.detach()), ce=float(out.ce.detach()))
        return (out.total, outputs) if return_outputs else out.total

    def _note(self, **values: float) -> None:
        self._window["kd"] += values["kd"]
        self._window["ce"] += values["ce"]
        self._window["batches"] += 1
        if self.keep_losses:
            self.losses.append(values)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's log, with this process's mean ``kd`` and ``ce`` since the last log."""
        window = self._window
        if "loss" in logs and window["batches"]:
            logs = {**logs, "kd": round(window["kd"] / window["batches"], 6),
                    "ce": round(window["ce"] / window["batches"], 6)}
            self._window = {"kd": 0.0, "ce": 0.0, "batches": 0}
        super().log(logs, start_time)

    # ---- checkpoints

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        state = self.train_dataset.state_dict()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.args.world_size > 1:
            states: list[Any] = [None] * self.args.world_size
            torch.distributed.all_gather_object(states, state)
            state = CacheDataset.merge_states(states)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            CacheLocation(folder).write_atomic(READER_STATE_FILE, json.dumps(state).encode("utf-8"))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Trainer's train; a resumed run also takes the reader's position from the checkpoint."""
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir) or True  # None: Trainer says there is none
        if isinstance(path, str):
            self.train_dataset.load_state_dict(_reader_state(path))
        return super().train(path, *args, **kwargs)


def _as_logits(values: Tensor) -> Tensor:
    return values


def _reader_state(checkpoint: str) -> dict[str, Any]:
    path = os.path.join(checkpoint, READER_STATE_FILE)
    if not os.path.isfile(path):
        raise StudentError(f"{checkpoint} has no {READER_STATE_FILE}: it was not saved by a DistillationTrainer, so "
                           "the reader cannot resume where it stopped; resume from one of its checkpoints, or start "
                           "afresh")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
