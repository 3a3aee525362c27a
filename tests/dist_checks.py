"""Run under torchrun by tests/test_distributed.py: expert/data-parallel runs against the one-process model.

Every rank builds the same full tiny model and the same global batch, computes the one-process reference
itself, then for each (dp, ep) layout shards the model for training (FSDP2, experts over ep), runs its slice of
the batch and compares; inference shards only the experts. Each rank
writes what it measured to OUT/rank{r}.json; the pytest side asserts on it.

    torchrun --standalone --nproc-per-node 2 tests/dist_checks.py OUT
"""
from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from longcat_flash import distributed as lcd
from longcat_flash.checkpoint.hf import LongcatFlash
from longcat_flash.infer.engine import Engine, EngineConfig
from longcat_flash.infer.fused import fuse_for_inference
from longcat_flash.infer.sampling import SamplingParams
from longcat_flash.presets import tiny

SEQ, PER_RANK = 8, 2


def build_model() -> LongcatFlash:
    torch.manual_seed(0)
    model = LongcatFlash(tiny())
    for router in model.routers():  # varied routing: some tokens pick 0, some all K zero experts
        torch.nn.init.normal_(router.classifier.weight, 0.0, 0.3)
        router.e_score_correction_bias.normal_(0.0, 0.05)
    return model


def loss_fn(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    out = model(ids, with_mtp=True)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) \
        + F.cross_entropy(out.mtp_logits[:, :-1].flatten(0, 1), ids[:, 2:].flatten())
    return loss, out.logits.detach(), [r.tokens_per_expert for r in out.routing]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_layout(reference: LongcatFlash, ref: dict, ids: torch.Tensor, dp: int, ep: int, overlap: bool
               ) -> tuple[dict, list[torch.Tensor]]:
    """Shard a copy of the reference over a (dp, ep) mesh for training (FSDP2, experts over ep), run this rank's
    batch slice, compare with `ref`. Returns the record and the raw outputs (logits, whole gradients)."""
    mesh = lcd.build_mesh(dp, ep)
    model = lcd.parallelize(copy.deepcopy(reference), mesh, overlap=overlap)
    rank, b = dist.get_rank(), ids.shape[0] // dist.get_world_size()
    loss, logits, counts = loss_fn(model, ids[rank * b:(rank + 1) * b])
    loss.backward()
    lcd.average_expert_gradients(model, mesh)
    grads = {name: full(p.grad) for name, p in model.named_parameters()}
    grad_diff = max(max_diff(g, ref["grads"][name]) for name, g in grads.items())
    raw = [logits] + list(grads.values())
    norm = lcd.clip_grad_norm_(model, ref["norm"] / 2, sharded=True)  # the sharded norm, then the clip it applies
    clipped = lcd.clip_grad_norm_(model, float("inf"), sharded=True)
    global_counts = lcd.global_counts(torch.stack(counts), mesh)
    return {"dp": dp, "ep": ep, "overlap": overlap,
            "logits_diff": max_diff(logits, ref["logits"][rank * b:(rank + 1) * b]),
            "grad_diff": grad_diff, "grad_scale": max(float(g.abs().max()) for g in ref["grads"].values()),
            "norm_rel_diff": abs(float(norm) / ref["norm"] - 1), "clipped_rel": float(clipped) / ref["norm"],
            "counts_equal": torch.equal(global_counts, torch.stack(ref["counts"])),
            "expert_rows": model.model.layers[0].mlp.experts.gate_up_proj.to_local().shape[0]}, raw


def layout_records(model: LongcatFlash, ref: dict, ids: torch.Tensor, dp: int, ep: int) -> list[dict]:
    """One record per overlap setting; with experts sharded, also whether overlap off gave the same bits."""
    on, raw_on = run_layout(model, ref, ids, dp, ep, overlap=True)
    if ep == 1:
        return [on]
    off, raw_off = run_layout(model, ref, ids, dp, ep, overlap=False)
    off["bitwise_equal_to_overlap"] = all(torch.equal(a, b) for a, b in zip(raw_on, raw_off))
    return [on, off]


def reference_run(model: LongcatFlash, ids: torch.Tensor) -> dict:
    ref = copy.deepcopy(model)
    loss, logits, counts = loss_fn(ref, ids)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    return {"logits": logits, "counts": counts, "norm": float(norm),
            "grads": {n: p.grad for n, p in ref.named_parameters()}}


def traffic(model: LongcatFlash, ids: torch.Tensor, ep: int, all_zero: bool) -> dict:
    """Bytes this rank's all-to-alls sent, and what the routing says they should be (FFN slots only)."""
    mesh = lcd.build_mesh(dist.get_world_size() // ep, ep)
    sharded = lcd.shard_experts(copy.deepcopy(model), mesh.get_group("ep"))
    if all_zero:
        for router in sharded.routers():
            router.e_score_correction_bias[: tiny().n_routed_experts] = -10.0  # zero experts always win
    rank, b = dist.get_rank(), ids.shape[0] // dist.get_world_size()
    with torch.no_grad():
        out = sharded(ids[rank * b:(rank + 1) * b])
    stats = lcd.comm_stats(sharded)
    e, me = tiny().n_routed_experts // ep, mesh.get_group("ep").rank()
    owner = [torch.where(r.ids < tiny().n_routed_experts, r.ids // e, me) for r in out.routing]
    off_rank_slots = torch.tensor(sum(int((o != me).sum()) for o in owner))
    zero_slots = sum(int((r.ids >= tiny().n_routed_experts).sum()) for r in out.routing)
    totals = torch.tensor([stats.bytes_sent, stats.rows_sent, int(off_rank_slots)])
    dist.all_reduce(totals)  # every off-rank slot costs one row out (dispatch) and one row back (combine)
    return {"all_zero": all_zero, "bytes": int(totals[0]), "rows": int(totals[1]),
            "expected_rows": 2 * int(totals[2]), "zero_slots": zero_slots, "tokens": stats.tokens,
            "row_bytes": tiny().hidden_size * 4}


def checkpoint_roundtrip(model: LongcatFlash, ep: int) -> dict:
    """Save from a sharded model in the official layout; a single process loads exactly the full weights."""
    mesh = lcd.build_mesh(dist.get_world_size() // ep, ep)
    sharded = lcd.shard_experts(copy.deepcopy(model), mesh.get_group("ep"))
    path = [tempfile.mkdtemp() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path)
    with lcd.experts_gathered(sharded):
        if dist.get_rank() == 0:
            sharded.save_pretrained(path[0])
    dist.barrier()
    loaded = LongcatFlash.from_pretrained(path[0])
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(path[0])
    exact = all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    restored = sharded.model.layers[0].mlp.experts.down_proj.shape[0] == tiny().n_routed_experts // ep
    return {"exact": exact, "restored_shards": restored}


def engine_generation(model: LongcatFlash, ep: int) -> dict:
    """The inference engine with experts sharded over ep generates what the one-process engine does. Every rank
    serves the same requests, so every rank runs the same forwards and the all-to-alls line up."""
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    mesh = lcd.build_mesh(dist.get_world_size() // ep, ep)
    sharded = lcd.shard_experts(copy.deepcopy(model), mesh.get_group("ep"))
    result = {}
    for k in (0, 1):  # plain decoding, and MTP speculation (draft + one-pass verification)
        want = Engine(copy.deepcopy(model), EngineConfig(speculative=k)).generate(prompts, params)
        got = Engine(sharded, EngineConfig(speculative=k)).generate(prompts, params)
        result[f"speculative{k}"] = {"equal": got == want, "tokens": sum(map(len, got))}
    fused = copy.deepcopy(model)
    fuse_for_inference(fused)  # what load_engine hands out: its experts run hit by hit, on one device
    try:  # they ran on the global expert ids with a local slice of the experts: NaN, or an IndexError
        lcd.shard_experts(fused, mesh.get_group("ep"))
        result["fused_refused"] = ""
    except ValueError as err:
        result["fused_refused"] = str(err)
    return result


def main(out_dir: str) -> None:
    lcd.init()
    world, rank = lcd.world_size(), lcd.rank()
    model = build_model()
    ids = torch.randint(3, tiny().vocab_size, (PER_RANK * world, SEQ), generator=torch.Generator().manual_seed(1))
    ref = reference_run(model, ids)
    layouts = [(world // ep, ep) for ep in (world, world // 2, 1)]
    result = {
        "world": world,
        "layouts": [r for dp, ep in dict.fromkeys(layouts) for r in layout_records(model, ref, ids, dp, ep)],
        "traffic": [traffic(model, ids, world, all_zero) for all_zero in (False, True)],
        "checkpoint": checkpoint_roundtrip(model, world),
        "engine": engine_generation(model, world),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    lcd.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
