"""The shortest honest training loop over logitcache's Python API: a student, the cache's
packed batches, logitcache's distillation loss and AdamW, with a resumable reader.

    python examples/own_training_loop.py runs/demo/cache --steps 20

Everything else (schedules, accumulation, evaluation, several students) is yours to add, or
`logitcache train` does it.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from logitcache.config import LossConfig
from logitcache.integrations.transformers import CacheBatches, loss_targets
from logitcache.pipeline.common.packed_attention import choose_packing_mask, packed_forward
from logitcache.pipeline.distill.training import packed_distillation_loss
from logitcache.storage_schemas.shard_reader import CacheReader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    args = parser.parse_args()

    vocab = CacheReader(args.cache).manifest.layout.vocab_size  # the student predicts the teacher's tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = LossConfig(kind="forward_kl", alpha=0.5)
    # records are packed into rows; this says how the model keeps them from attending to each other
    mask = choose_packing_mask(model, device=torch.device("cpu"), autocast=contextlib.nullcontext, where="student")
    batches = CacheBatches(args.cache, batch_tokens=args.batch_tokens)

    for step, batch in zip(range(1, args.steps + 1), batches, strict=False):
        hidden = packed_forward(model, batch["input_ids"], batch["position_ids"], mask_form=mask)
        out = packed_distillation_loss(hidden, model.get_output_embeddings(), **loss_targets(batch), loss=loss,
                                       vocab_size=vocab)
        out.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batches.observe(batch["cursors"])  # batches.state_dict() now resumes after this batch
        print(f"step {step}: loss {out.total.item():.4f}  kd {out.kd_for_log.item():.4f}  ce {out.ce.item():.4f}")


if __name__ == "__main__":
    main()
