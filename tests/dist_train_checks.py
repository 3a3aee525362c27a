"""Run under torchrun (2 ranks) by tests/test_distributed_train.py: the trainer with experts sharded.

    torchrun --standalone --nproc-per-node 2 tests/dist_train_checks.py REF_RUN OUT_ROOT CORPUS CACHE

REF_RUN is a finished single-process tiny run (20 steps, checkpoints at 10 and 20). Three runs, all on 2 ranks:
  OUT_ROOT/ep_resumed   EP=2 continues a copy of REF_RUN's step-10 checkpoint (single process -> EP)
  OUT_ROOT/dp           --dp 2 from scratch, 20 steps
  OUT_ROOT/ep           `longcat train --ep 2 ...` through the CLI, 20 steps (the command line users type)
Each rank writes OUT_ROOT/<run>/rank{r}.json with its routers' final biases (for the cross-rank
check) and how many experts it held.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from longcat_flash import cli
from longcat_flash import distributed as lcd
from longcat_flash.train import trainer
from longcat_flash.train.config import apply_overrides, recipe


def record_biases() -> None:
    """Wrap trainer.finish so that every rank dumps its final router biases (test instrumentation only)."""
    finish = trainer.finish

    def finish_and_record(run: trainer.Run):
        biases = [r.e_score_correction_bias.tolist() for r in run.model.routers()]
        experts = run.model.model.layers[0].mlp.experts.gate_up_proj.shape[0]
        Path(run.out, f"rank{lcd.rank()}.json").write_text(json.dumps({"biases": biases, "experts": experts}))
        return finish(run)

    trainer.finish = finish_and_record


def main(ref: Path, out_root: Path, corpus: str, cache: str) -> None:
    lcd.init()
    record_biases()
    overrides = [f"data.source={corpus}", f"data.cache_dir={cache}", f"data.tokenizer={ref / 'tokenizer.json'}",
                 "max_steps=20", "dtype=float32", "checkpoint.save_every=10"]
    resumed = out_root / "ep_resumed"
    if lcd.is_main():
        shutil.copytree(ref, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_00000020")
    dist.barrier()
    dp_and_ep = [(resumed, True, lcd.build_mesh(1, 2)), (out_root / "dp", False, lcd.build_mesh(2, 1))]
    for out, resume, mesh in dp_and_ep:  # every rank walks the same list: the meshes are collectives
        cfg = trainer.resume_config(out) if resume else apply_overrides(recipe("tiny"), overrides)
        trainer.train(cfg, out, resume=resume, progress=False, mesh=mesh)
    flags = [item for o in overrides for item in ("--set", o)]
    cli.main(["train", "--preset", "tiny", "--ep", "2", "--out", str(out_root / "ep"), "--no-progress", *flags])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])
