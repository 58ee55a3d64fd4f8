"""A zero-cost causal-LM teacher: logits of a real vocabulary size at memory speed, no matmul.

Not a benchmark: ``bench_pipeline.py`` uses it to time stage one's host side apart from a
teacher forward. It is a ``transformers`` model in its own right, saved with
``save_pretrained`` together with this file (``auto_map``), so that ``load_teacher`` loads it
with ``teacher.trust_remote_code: true`` in any process (a Dask worker included) and stage
one runs exactly as for a real teacher: config, tokenizer, weights, the split-head check,
identity and weights hash, hidden states, then the LM head in chunks of positions.

How the logits are made. The body turns each position into two numbers, its "hidden state"
``[B, L, 2]``: a row ``a`` (0..63) from the position's own token and an offset ``c``
(0..65535) from a hash of its own token and the two before it (the input embedding,
``[V, 3]``, holds each token's row and two random hash codes). The head is two gathers and
an add per position::

    logits = rows_a[a] + noise[c : c + V]          # [p, V] float32

``rows_a`` is a Zipf log-frequency prior over a random order of the vocabulary (scaled by
1.3) plus Gaussian noise of standard deviation 1.5, one row per ``a``; ``noise`` is one
Gaussian vector (standard deviation 1.0) of ``V + 65535`` values, of which each position
reads the window at its offset (a row gather from ``noise.unfold``, as cheap as a gather
from a table). That gives about 4 million distinct full-support distributions (a shard of
a few hundred thousand positions repeats almost none of them, so its labels compress like a
real teacher's) of about 4.1 nats mean entropy (0.3 to 6.3 over demo text), whose top-64
keep about 80% of the mass and top-8 about 60%, and whose top-64 sets share about 20 ids
between two positions (frequent tokens are in most sets, as with a real teacher).
The head writes ``2 p x V`` floats into buffers it keeps and reads as many: a few passes
over memory, where a real head's output is one. It adds its own thread CPU time to
``cpu_seconds`` so that its cost can be taken out of a measurement.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput

ROWS = 64
OFFSETS = 1 << 16
PRIOR_SCALE = 1.3
SIGMA_A = 1.5
SIGMA_NOISE = 1.0
HASH_PRIMES = (1, 40503, 9973)  # own token, previous, the one before


class StandinConfig(PretrainedConfig):
    model_type = "logitcache_standin"

    def __init__(self, *, vocab_size: int = 32000, rows: int = ROWS, offsets: int = OFFSETS, seed: int = 0,
                 **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.rows = rows
        self.offsets = offsets
        self.seed = seed
        self.hidden_size = 2
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class StandinHead(nn.Module):
    """``[p, 2]`` (row, offset) to ``[p, V]`` logits by two gathers and one add.

    The logits are written into two buffers kept from call to call (and returned as a view
    of the first): a fresh 512 MB tensor per chunk would cost more in page faults than the
    gathers themselves. The caller (``label_positions``) is done with a chunk's logits before
    it asks for the next. ``weight`` is ``rows_a`` transposed, ``[V, rows]``, so that code that
    reads the head's width as ``weight.shape[0]`` sees the vocabulary.
    """

    def __init__(self, config: StandinConfig) -> None:
        super().__init__()
        self.rows_a = nn.Parameter(torch.zeros(config.rows, config.vocab_size), requires_grad=False)
        self.noise = nn.Parameter(torch.zeros(config.vocab_size + config.offsets - 1), requires_grad=False)
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self.cpu_seconds = 0.0

    @property
    def weight(self) -> torch.Tensor:
        return self.rows_a.T

    def _out(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        kept = self._kept
        if kept is None or kept[0].shape[0] < positions or kept[0].dtype != self.rows_a.dtype:
            kept = self._kept = tuple(torch.empty(positions, self.rows_a.shape[1], dtype=self.rows_a.dtype,
                                                  device=self.rows_a.device) for _ in range(2))
        return kept[0][:positions], kept[1][:positions]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        started = time.thread_time()
        rows, vocab = self.rows_a.shape
        a = hidden[..., 0].reshape(-1).long().clamp_(0, rows - 1)
        c = hidden[..., 1].reshape(-1).long().clamp_(0, self.noise.shape[0] - vocab)
        logits, more = self._out(a.numel())
        torch.index_select(self.rows_a, 0, a, out=logits)
        torch.index_select(self.noise.unfold(0, vocab, 1), 0, c, out=more)
        logits.add_(more)
        self.cpu_seconds += time.thread_time() - started
        return logits.view(*hidden.shape[:-1], vocab)


class StandinModel(PreTrainedModel):
    """The body: each position's (row of its token, offset hashed from its last three tokens)."""

    config_class = StandinConfig
    base_model_prefix = "model"

    def __init__(self, config: StandinConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, 3)
        self.embed_tokens.weight.requires_grad_(False)
        self.cpu_seconds = 0.0
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> BaseModelOutput:
        started = time.thread_time()
        codes = self.embed_tokens(input_ids).long()  # [B, L, 3]: row, two hash codes
        offset = codes[..., 1] * HASH_PRIMES[0]
        for back, prime in ((1, HASH_PRIMES[1]), (2, HASH_PRIMES[2])):
            earlier = torch.zeros_like(offset)
            earlier[:, back:] = codes[:, :-back, 2]
            offset += earlier * prime
        hidden = torch.stack([codes[..., 0], offset % self.config.offsets], dim=-1).float()
        self.cpu_seconds += time.thread_time() - started
        return BaseModelOutput(last_hidden_state=hidden)


class StandinForCausalLM(PreTrainedModel):
    config_class = StandinConfig
    base_model_prefix = "model"

    def __init__(self, config: StandinConfig) -> None:
        super().__init__(config)
        self.model = StandinModel(config)
        self.lm_head = StandinHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every tensor is in the checkpoint; fill_tables() makes them

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_decoder(self) -> nn.Module:
        return self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutput:
        hidden = self.model(input_ids, attention_mask).last_hidden_state
        return CausalLMOutput(logits=self.lm_head(hidden))

    @torch.no_grad()
    def fill_tables(self) -> None:
        """The rows, the noise and each token's row and hash codes, from ``config.seed``."""
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        order = torch.randperm(config.vocab_size, generator=generator).float()
        prior = -PRIOR_SCALE * torch.log1p(order)
        self.lm_head.rows_a.copy_(prior + SIGMA_A * torch.randn(config.rows, config.vocab_size, generator=generator))
        self.lm_head.noise.copy_(SIGMA_NOISE * torch.randn(self.lm_head.noise.shape[0], generator=generator))
        codes = self.model.embed_tokens.weight
        codes[:, 0] = torch.randint(0, config.rows, (config.vocab_size,), generator=generator).float()
        codes[:, 1:] = torch.randint(0, config.offsets, (config.vocab_size, 2), generator=generator).float()


def save_standin(out_dir: Path, tokenizer_dir: Path, *, vocab_size: int, seed: int = 0) -> Path:
    """A stand-in teacher of ``vocab_size`` logits with the tokenizer of ``tokenizer_dir``,
    saved (weights, config with ``auto_map``, this file, tokenizer) to ``out_dir``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the {vocab_size} logits")
    StandinConfig.register_for_auto_class()
    StandinForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    config = StandinConfig(vocab_size=vocab_size, seed=seed, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = StandinForCausalLM(config)
    model.fill_tables()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir

