"""The demo teacher: a small causal LM trained from the corpus, so the whole job runs offline.

``logitcache run`` with no config has no real teacher to call (no network), so it trains one:
a byte-level BPE tokenizer and a small Llama model, on the corpus documents that are *not*
in stage two's held-out split (the same record-id hash, so the evaluation documents are
unseen by teacher and students alike). Documents are concatenated, separated by the end-
of-sequence token, and cut into ``seq_length`` sequences; AdamW with warmup and cosine
decay runs for a fixed number of steps, so the teacher is the same on every machine given
the same seed and torch build. It is saved with ``save_pretrained`` and loaded by stage one
through the ordinary ``from_pretrained`` path, like any teacher.

A ``demo_teacher.json`` beside the weights records the settings and a fingerprint of the
training documents; a later run with the same ones reuses the saved teacher instead of
training again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from logitcache.config import CorpusConfig, DemoTeacherConfig, config_to_dict
from logitcache.pipeline.common.corpus import iter_work_units
from logitcache.pipeline.common.splits import is_held_out
from logitcache.pipeline.common.windows import record_id_for
from logitcache.storage_schemas.fingerprint import fingerprint

MARKER = "demo_teacher.json"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(kw_only=True)
class DemoTeacherResult:
    path: str
    reused: bool
    documents: int
    tokens: int
    seconds: float
    final_loss: float | None

    def to_text(self) -> str:
        if self.reused:
            return (f"demo teacher: reused {self.path} (trained by an earlier run on the same {self.documents} "
                    "documents and settings)")
        return (f"demo teacher: trained {self.path} on {self.documents} documents ({self.tokens:,} tokens) "
                f"in {self.seconds:.0f} s, final training loss {self.final_loss:.3f}. It is a DEMO teacher, "
                "trained here from the sample corpus so the job runs offline; use a real model for real work")


def training_texts(corpus: CorpusConfig, held_out_fraction: float) -> list[str]:
    """The corpus documents outside stage two's held-out split (the same split key: the
    document's first record id)."""
    texts = []
    for unit in iter_work_units(corpus):
        keys = np.array([record_id_for(doc.key, 0) for doc in unit.documents], dtype=np.uint64)
        held = is_held_out(keys, held_out_fraction) if len(keys) else np.zeros(0, bool)
        texts.extend(doc.text for doc, out in zip(unit.documents, held, strict=True) if not out)
    return texts


def prepare_demo_teacher(cfg: DemoTeacherConfig, *, corpus: CorpusConfig, held_out_fraction: float,
                         progress: bool = True) -> DemoTeacherResult:
    """Train (or reuse) the demo teacher described by ``cfg`` into ``cfg.output``."""
    started = time.perf_counter()
    texts = training_texts(corpus, held_out_fraction)
    if not texts:
        from logitcache.errors import CorpusError

        raise CorpusError("demo_teacher: the corpus has no documents outside the held-out split to train on")
    identity = {"settings": config_to_dict(cfg), "documents": fingerprint(texts),
                "torch": torch.__version__.split("+")[0]}
    out = Path(cfg.output)
    marker = out / MARKER
    if marker.is_file() and (out / "config.json").is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        if saved.get("identity") == identity:
            return DemoTeacherResult(path=str(out), reused=True, documents=len(texts), tokens=saved.get("tokens", 0),
                                     seconds=time.perf_counter() - started, final_loss=saved.get("final_loss"))

    torch.manual_seed(cfg.seed)
    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size)
    stream = _token_stream(tokenizer, texts)
    model = _model(cfg, tokenizer)
    final_loss = _train(model, stream, cfg, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    tokens = int(stream.size)
    marker.write_text(json.dumps({"identity": identity, "tokens": tokens, "final_loss": final_loss,
                                  "note": "demo teacher trained by logitcache run; not a real model"}, indent=1),
                      encoding="utf-8")
    return DemoTeacherResult(path=str(out), reused=False, documents=len(texts), tokens=tokens,
                             seconds=time.perf_counter() - started, final_loss=final_loss)


def train_tokenizer(texts: list[str], *, vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (any text encodes; ``<s>`` prepended) as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def _token_stream(tokenizer: Any, texts: list[str]) -> np.ndarray:
    eos = tokenizer.eos_token_id
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return np.concatenate([np.asarray(row + [eos], dtype=np.int64) for row in ids])


def _model(cfg: DemoTeacherConfig, tokenizer: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.hidden_size * 8 // 3, max_position_embeddings=max(512, cfg.seq_length),
        attention_dropout=cfg.dropout, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def _train(model: Any, stream: np.ndarray, cfg: DemoTeacherConfig, *, progress: bool) -> float:
    rng = np.random.default_rng(cfg.seed)
    length = cfg.seq_length
    starts_max = max(1, stream.size - length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, cfg.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    smoothed = None
    bar = tqdm(total=cfg.steps, desc="demo teacher", unit="step", disable=not progress, dynamic_ncols=True)
    for _ in range(cfg.steps):
        starts = rng.integers(0, starts_max, size=cfg.batch_size)
        rows = np.stack([np.resize(stream[s:s + length], length) for s in starts])
        batch = torch.from_numpy(rows)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss  # the model shifts labels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        bar.update(1)
        bar.set_postfix_str(f"loss {smoothed:.3f}")
    bar.close()
    return float(smoothed)
