"""Run under torchrun by tests/test_distributed_train.py: the trainer with FSDP2 and experts sharded over ep.

    torchrun --standalone --nproc-per-node N tests/dist_train_checks.py REF_RUN OUT_ROOT CORPUS CACHE [RESUME_FROM]

REF_RUN is a finished single-process tiny run (REFERENCE: STEPS steps, float32, checkpoints every SAVE_EVERY, the MTP
head idle until step 3, so that the router monitors' side backward at step 0 meets an FSDP unit that never ran). On N
ranks, for every (dp, ep) layout of the world (ep = N, N/2, 1), train the same STEPS steps from scratch into
OUT_ROOT/w{N}_ep{ep}; without RESUME_FROM the ep = N/2 run goes through the CLI (`longcat train --ep ...`, at
world 4 `--dp 2`, which leaves ep to be inferred), the command users type, last (the CLI leaves the process group
when it is done). At world 2 every run also recomputes each layer in backward (activation checkpointing) and chunks
the cross-entropy: the losses must not change.
With RESUME_FROM (a run directory whose newest checkpoint is step SAVE_EVERY, written at another world size), also
resume a copy of it at every layout into OUT_ROOT/w{N}_ep{ep}_resumed, and last another copy through the CLI with
no --ep or --dp (`longcat train --resume`) into OUT_ROOT/w{N}_cli_resumed. Each rank writes
OUT_ROOT/<run>/rank{r}.json with its routers' final biases and the expert rows it held.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from longcat_flash import cli
from longcat_flash import distributed as lcd
from longcat_flash.train import checkpoints, trainer
from longcat_flash.train.config import apply_overrides, recipe

STEPS, SAVE_EVERY = 8, 4
REFERENCE = [f"max_steps={STEPS}", "dtype=float32", f"checkpoint.save_every={SAVE_EVERY}", "loss.mtp_start_step=3",
             "sample_tokens=4"]  # the closing sample is generated under FSDP too, but need not be long


def record_biases() -> None:
    """Wrap trainer.finish so that every rank dumps its final router biases (test instrumentation only)."""
    finish = trainer.finish

    def finish_and_record(run: trainer.Run):
        biases = [r.e_score_correction_bias.tolist() for r in run.model.routers()]
        experts = run.model.model.layers[0].mlp.experts.gate_up_proj.to_local().shape[0]
        Path(run.out, f"rank{lcd.rank()}.json").write_text(json.dumps({"biases": biases, "experts": experts}))
        return finish(run)

    trainer.finish = finish_and_record


def main(ref: Path, out_root: Path, corpus: str, cache: str, resume_from: Path | None) -> None:
    lcd.init("cpu")
    record_biases()
    world = lcd.world_size()
    overrides = [f"data.source={corpus}", f"data.cache_dir={cache}", f"data.tokenizer={ref / 'tokenizer.json'}",
                 *REFERENCE]
    if world == 2:  # the memory savers too: per-layer recomputation, and the cross-entropy in 48-token chunks
        overrides += ["activation_checkpointing=true", "loss.logits_chunk=48"]
    layouts = list(dict.fromkeys((world, world // 2, 1)))
    for ep in layouts:  # every rank walks the same list: meshes are collectives
        if resume_from is not None:
            resumed = out_root / f"w{world}_ep{ep}_resumed"
            if lcd.is_main():
                shutil.copytree(resume_from, resumed)
            dist.barrier()
            trainer.train(checkpoints.resume_config(resumed), resumed, resume=True, progress=False,
                          mesh=lcd.build_mesh(world // ep, ep))
        if ep != world // 2 or resume_from is not None:
            trainer.train(apply_overrides(recipe("tiny"), overrides), out_root / f"w{world}_ep{ep}", progress=False,
                          mesh=lcd.build_mesh(world // ep, ep))
    if resume_from is not None:  # last: the CLI leaves the process group
        resumed = out_root / f"w{world}_cli_resumed"
        if lcd.is_main():
            shutil.copytree(resume_from, resumed)
        dist.barrier()
        cli.main(["train", "--resume", str(resumed), "--device", "cpu", "--no-progress"])
        return
    flags = [item for o in overrides for item in ("--set", o)]  # last: the CLI leaves the process group
    layout = ["--dp", "2"] if world == 4 else ["--ep", str(world // 2)]  # --dp alone: ep = world / dp
    cli.main(["train", "--preset", "tiny", "--device", "cpu", *layout, "--out",
              str(out_root / f"w{world}_ep{world // 2}"), "--no-progress", *flags])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4],
         Path(sys.argv[5]) if len(sys.argv) > 5 else None)
