"""Training from a cache under ``transformers.Trainer``: the same batches, losses and weights
as ``logitcache train``, and a checkpoint that resumes the reader exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from logitcache.config import config_from_dict
from logitcache.errors import StudentError
from logitcache.integrations.transformers import (
    READER_STATE_FILE,
    CacheBatches,
    DistillationTrainer,
    collate_batches,
    logitcache_optimizer,
)
from logitcache.pipeline.distill.students import build_student
from logitcache.stages.build_cache import build_cache
from logitcache.stages.train_students import train_students
from logitcache.storage_schemas.shard_reader import CacheReader
from tests.stages.test_train_students import STUDENT, job_data

STEPS = 5


def one_student(loss: dict, **train) -> list[dict]:
    return [{"name": "s", "model": {"config": STUDENT}, "loss": {"chunk_tokens": 32, **loss},
             "optimizer": {"lr": 3e-3, "warmup_steps": 1}}]


@pytest.fixture(scope="module", params=[{"mode": "topk", "k": 8, "values": "q8"},
                                        {"mode": "topk+sampled", "k": 4, "samples": 8, "values": "q8"}],
                ids=["topk", "hybrid"])
def cache(request, tmp_path_factory, corpus_dir, tiny_causal_lm_dir):
    root = tmp_path_factory.mktemp("cache")
    data = job_data(root / "cache", corpus_dir, tiny_causal_lm_dir, root / "unused", soft_labels=request.param,
                    windows={"max_length": 48, "stride": 8})
    build_cache(config_from_dict(data), progress=False)
    return root / "cache"


def job(cache, corpus_dir, teacher, output, loss):
    return config_from_dict(job_data(cache, corpus_dir, teacher, output, students=one_student(loss),
                                     train={"steps": STEPS, "batch_tokens": 96, "save_every": 0,
                                            "output": str(output)}))


def trainer_for(cfg, output: Path, *, steps: int = STEPS, save_steps: int | None = None, **kwargs):
    student = build_student(cfg.students[0], manifest=CacheReader(cfg.cache).manifest, device=torch.device("cpu"),
                            seed=cfg.train.seed)
    batches = CacheBatches.for_job(cfg, pad_id=student.pad_token_id)
    args = TrainingArguments(
        output_dir=str(output), max_steps=steps, per_device_train_batch_size=1, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to="none",
        use_cpu=True, seed=cfg.train.seed, max_grad_norm=1.0, disable_tqdm=True, dataloader_num_workers=0)
    optimizers = logitcache_optimizer(student.model, cfg.students[0].optimizer, total_steps=cfg.train.steps)
    return DistillationTrainer(model=student.model, args=args, train_dataset=batches, optimizers=optimizers,
                               loss=cfg.students[0].loss, keep_losses=True, **kwargs)


@pytest.mark.parametrize("loss", [{"kind": "forward_kl", "alpha": 0.7},
                                  {"kind": "reverse_kl", "temperature": 2.0, "tail": "renormalize", "alpha": 1.0}],
                         ids=["fkl", "rkl-T2"])
def test_trainer_steps_equal_logitcache_train(tmp_path, cache, corpus_dir, tiny_causal_lm_dir, loss):
    if CacheReader(str(cache)).manifest.kind != "token_topk" and loss["kind"] != "forward_kl":
        pytest.skip("sampled caches train forward KL")
    cfg = job(cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "ours", loss)
    train_students(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "ours" / "s" / "metrics.jsonl").read_text().splitlines()]
    ours = [row["loss"] for row in rows if "loss" in row]

    trainer = trainer_for(cfg, tmp_path / "hf")
    trainer.train()
    theirs = [entry["total"] for entry in trainer.losses]
    assert len(ours) == len(theirs) == STEPS
    assert theirs == pytest.approx(ours, abs=1e-5)
    final = build_student(cfg.students[0], manifest=CacheReader(str(cache)).manifest, device=torch.device("cpu"),
                          seed=cfg.train.seed).model
    final.load_state_dict(type(final).from_pretrained(tmp_path / "ours" / "s" / "final").state_dict())
    for (name, mine), theirs_param in zip(final.named_parameters(), trainer.model.parameters(), strict=True):
        assert torch.allclose(mine, theirs_param, atol=1e-5), name
    logged = [entry for entry in trainer.state.log_history if "kd" in entry]
    assert len(logged) == STEPS and all(entry["ce"] > 0 for entry in logged)


def test_a_trainer_checkpoint_resumes_the_reader_exactly(tmp_path, cache, corpus_dir, tiny_causal_lm_dir):
    cfg = job(cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "unused", {"alpha": 0.5})
    whole = trainer_for(cfg, tmp_path / "whole", steps=6)
    whole.train()

    first = trainer_for(cfg, tmp_path / "split", steps=6, save_steps=3)
    first.add_callback(StopAt(3))  # stops after the checkpoint of step 3, as a kill would
    first.train()
    assert (tmp_path / "split" / "checkpoint-3" / READER_STATE_FILE).is_file()
    resumed = trainer_for(cfg, tmp_path / "split", steps=6, save_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert [e["total"] for e in resumed.losses] == pytest.approx([e["total"] for e in whole.losses[3:]], abs=1e-6)
    for mine, theirs in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)


def test_a_checkpoint_without_reader_state_is_refused(tmp_path, cache, corpus_dir, tiny_causal_lm_dir):
    cfg = job(cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "unused", {"alpha": 0.5})
    (tmp_path / "hf" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(StudentError, match=READER_STATE_FILE):
        trainer_for(cfg, tmp_path / "hf").train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))


def test_batches_carry_what_the_loss_needs(cache):
    batches = CacheBatches(str(cache), batch_tokens=96)
    first, second = (batch for batch, _ in zip(batches, range(2), strict=False))
    assert first["input_ids"].shape == (2, 48) and first["label_mask"].dtype == torch.bool
    labelled = first["label_mask"]
    # labels are unshifted: the target of position t is labels[t + 1]
    assert torch.equal(first["labels"][:, 1:][labelled[:, :-1] & (first["labels"][:, 1:] != -100)],
                       first["input_ids"][:, 1:][labelled[:, :-1] & (first["labels"][:, 1:] != -100)])
    assert "teacher_topk_ids" in first or "teacher_sample_ids" in first
    both = collate_batches([first, second])
    assert both["input_ids"].shape[0] == 4 and both["cursors"].shape[1] == 4


class StopAt(TrainerCallback):
    """Ends training after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def test_the_full_logits_path_of_sharded_models_gives_the_same_losses(tmp_path, cache, corpus_dir,
                                                                      tiny_causal_lm_dir):
    cfg = job(cache, corpus_dir, tiny_causal_lm_dir, tmp_path / "unused", {"alpha": 0.5})
    chunked = trainer_for(cfg, tmp_path / "chunked", steps=3)
    chunked.train()
    full = trainer_for(cfg, tmp_path / "full", steps=3, model_logits=True)  # what FSDP and DeepSpeed use
    full.train()
    assert [e["total"] for e in full.losses] == pytest.approx([e["total"] for e in chunked.losses], abs=1e-5)
