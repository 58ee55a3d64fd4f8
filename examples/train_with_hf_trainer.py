"""Train a student from a logitcache cache with Hugging Face's transformers.Trainer.

    python examples/train_with_hf_trainer.py runs/demo/cache runs/hf-student --steps 50
    torchrun --nproc_per_node=2 examples/train_with_hf_trainer.py CACHE OUTPUT      # DDP, one part of the cache per process
    accelerate launch --config_file examples/accelerate_fsdp.yaml \\
        examples/train_with_hf_trainer.py CACHE OUTPUT --student Qwen/Qwen2.5-0.5B # FSDP on the GPUs of one machine

--student is a transformers config as a JSON or YAML file (a model trained from scratch, its
vocabulary the cache's), or a pretrained model directory or hub name (its tokenizer must be
the cache's). Without it: a small Llama. The loss is logitcache's (--kind, --alpha,
--temperature); checkpoints every --save-steps hold the reader's position, and running the
same command with --resume continues exactly where the newest one stopped. The trained
model is saved to OUTPUT/final; a JSON line with the run's summary ends the output.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import yaml
from transformers import TrainingArguments

from logitcache.config import LossConfig, OptimizerConfig, StudentConfig
from logitcache.integrations.transformers import (
    CacheBatches,
    DistillationTrainer,
    logitcache_optimizer,
)
from logitcache.pipeline.distill.students import build_student
from logitcache.storage_schemas.shard_reader import CacheReader

SMALL_LLAMA = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 768}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", help="the cache directory (or fsspec URL)")
    parser.add_argument("output", help="where checkpoints and OUTPUT/final go")
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps (default 50)")
    parser.add_argument("--student", help="config file (.json/.yaml) or pretrained model path / hub name")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per batch and process (default 8192)")
    parser.add_argument("--shuffle-buffer", type=int, default=4096,
                        help="records shuffled together (default 4096); each process reads its own such windows")
    parser.add_argument("--kind", default="forward_kl", help="divergence: forward_kl, reverse_kl, jsd, tvd, soft_ce")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of the distillation term (default 0.5)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUTPUT")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def student_model(value: str | None) -> dict:
    """The student's model section: a config from scratch, or a pretrained path."""
    if value is None:
        return {"config": SMALL_LLAMA}
    path = Path(value)
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        return {"config": yaml.safe_load(path.read_text(encoding="utf-8"))}
    return {"path": value}


def main() -> None:
    args = parse_args()
    manifest = CacheReader(args.cache).manifest
    cuda = torch.cuda.is_available()
    student_cfg = StudentConfig(name="student", model=student_model(args.student),
                                optimizer=OptimizerConfig(lr=args.lr),
                                loss=LossConfig(kind=args.kind, alpha=args.alpha, temperature=args.temperature))
    student = build_student(student_cfg, manifest=manifest, device=torch.device("cpu"), seed=args.seed)
    training = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=1,
        logging_steps=max(1, min(10, args.steps)),
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        report_to="none", seed=args.seed, bf16=cuda, use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=os.environ.get("RANK", "0") != "0")
    trainer = DistillationTrainer(
        model=student.model, args=training, loss=student_cfg.loss, processing_class=student.tokenizer,
        train_dataset=CacheBatches(args.cache, batch_tokens=args.batch_tokens, pad_id=student.pad_token_id,
                                   seed=args.seed, shuffle_buffer=args.shuffle_buffer),
        optimizers=logitcache_optimizer(student.model, student_cfg.optimizer, total_steps=args.steps))
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model(str(Path(args.output) / "final"))
    if trainer.is_world_process_zero():
        last = next((row for row in reversed(trainer.state.log_history) if "kd" in row), {})
        print(json.dumps({"steps": trainer.state.global_step, "train_loss": round(result.training_loss, 6),
                          "kd": last.get("kd"), "ce": last.get("ce"),
                          "final": str(Path(args.output) / "final")}))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process ends together: none tears down while another still talks
        torch.distributed.destroy_process_group()  # else gloo's threads may abort the process at exit


if __name__ == "__main__":
    main()
