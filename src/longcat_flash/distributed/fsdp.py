"""Training parallelism: FSDP2 over the whole world for dense weights, experts sharded over ep and then FSDP-sharded
over dp (torchtitan's dp_shard x ep layout), and the few reductions FSDP does not do for us.

    dense parameter      Shard(0) over all W ranks                            1/W of it per rank
    expert parameter     DTensor (E, ...) Shard(0) over ep (this rank's E/ep experts), FSDP Shard(0) over dp
                         -> each rank holds E/W experts' rows; checkpoints see the global expert index

Gradients: FSDP reduce-scatters in fp32 and divides by W for the dense parameters, which averages the per-rank
mean losses into the global mean. Expert gradients already summed the tokens of every ep rank through the
combine's backward all-to-all, so after their dp reduce-scatter (divided by dp) they are divided by ep as well:
the same global mean (`average_expert_gradients`).
Parameters, gradients and Adam moments all live sharded, so the state per rank falls as 1/W (`state_bytes`).

Mixed precision is FSDP's: parameters are gathered in bf16 for compute, gradients reduced in fp32, the master
weights and Adam moments stay fp32; the routers are their own FSDP unit kept in fp32 (their probabilities are
~1/(E+Z), the same order as the correction bias, so bf16 would flip top-k choices).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from ..config import ModelConfig
from ..model import Transformer
from ..model.moe import local_part
from .expert_parallel import moe_layers, shard_experts


def check_shardable(config: ModelConfig, ep: int = 1) -> None:
    """What FSDP and `ep`-way expert parallelism cannot shard, refused before a run builds anything (its tokenizer
    and data may take minutes)."""
    if config.n_routed_experts % ep:
        raise ValueError(f"model.n_routed_experts={config.n_routed_experts} is not divisible by the expert-parallel "
                         f"size {ep} (--ep): each ep rank holds an equal share of the experts")
    if config.tie_word_embeddings:
        raise ValueError("model.tie_word_embeddings is not supported with more than one process: FSDP would shard "
                         "the embedding and the lm_head as two parameters; train it in one process, or untied "
                         "(--set model.tie_word_embeddings=false: from a tied init_from, the lm_head starts as a copy "
                         "of the embedding)")


def parallelize(model: Transformer, mesh: DeviceMesh | None, *, bf16: bool = False, overlap: bool = True,
                activation_checkpointing: bool = False) -> Transformer:
    """Shard a model (built on the meta device or on its target device) over the (dp, ep) `mesh` for training.

    With `mesh` None (one process) only activation checkpointing applies. Call before building the optimizer
    and before initialising the weights (train.optim.init_parameters fills each rank's rows).
    """
    if activation_checkpointing:
        layers = model.model.layers
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer)
    if mesh is None:
        return model
    check_shardable(model.config, mesh["ep"].size())
    world = init_device_mesh(mesh.device_type, (mesh.size(),), mesh_dim_names=("world",))
    if mesh["ep"].size() > 1:
        distribute_experts(model, mesh["ep"], overlap)
    compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for moe in moe_layers(model):
        fully_shard(moe.experts, mesh=mesh["dp"], mp_policy=compute)
        fully_shard(moe.router, mesh=world["world"], mp_policy=fp32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=world["world"], mp_policy=compute)
    if model.model.mtp is not None:
        fully_shard(model.model.mtp, mesh=world["world"], mp_policy=compute)
    # The root unit (embeddings, final norm, lm_head) stays gathered from forward to backward: the loss applies
    # the lm_head itself, chunk by chunk, after the forward (train/losses.py chunked_lm_loss).
    fully_shard(model, mesh=world["world"], mp_policy=compute, reshard_after_forward=False)
    return model


def distribute_experts(model: nn.Module, ep_mesh: DeviceMesh, overlap: bool = True) -> None:
    """Make every MoE's expert weights DTensors sharded by expert over `ep_mesh` (each rank keeps its E/ep rows)
    and route tokens to them with an all-to-all dispatcher."""
    shard_experts(model, ep_mesh.get_group(), overlap,
                  wrap=lambda local: DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False))


def average_expert_gradients(model: nn.Module, mesh: DeviceMesh | None) -> None:
    """Divide the expert gradients by ep after backward: FSDP's dp reduce-scatter divided them by dp, and the
    global mean needs W = dp * ep (module docstring). (FSDP's own divide factor would do this inside the
    reduce-scatter, but it needs PREMUL_SUM, which gloo lacks.)"""
    if mesh is None or mesh["ep"].size() == 1:
        return
    grads = [p.grad for m in moe_layers(model) for p in m.experts.parameters()
             if p.grad is not None]
    torch._foreach_div_([local_part(g) for g in grads], mesh["ep"].size())


@contextmanager
def side_backward(model: nn.Module, idle: Sequence[nn.Module] = ()) -> Iterator[None]:
    """For a backward pass that is not the step's (the monitors' `autograd.grad` on the router probabilities):
    FSDP modules keep their gathered weights afterwards and reduce no gradients, so the step's own backward
    finds everything as the forward left it. No-op without FSDP.

    idle: units the forward did not run (the MTP head before loss.mtp_start_step, or at weight 0), left as they
    are: FSDP's post-backward of a unit never gathered, with gradient sync off, reads a parameter it never made
    (torch 2.13, AttributeError '_unsharded_param'); with it on, it skips the unit as the step's backward does."""
    modules = [m for m in model.modules() if isinstance(m, FSDPModule) and not any(m is u for u in idle)]
    for m in modules:
        m.set_requires_gradient_sync(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for m in modules:
            m.set_requires_gradient_sync(True, recurse=False)
            m.set_reshard_after_backward(True, recurse=False)


# ---- what FSDP leaves to us: the global gradient norm, per-rank state size ----

def clip_grad_norm_(model: nn.Module, max_norm: float, sharded: bool) -> torch.Tensor:
    """Clip to the global gradient norm (as torch.nn.utils.clip_grad_norm_ on one process) and return it.

    Sharded (FSDP): every gradient element lives on exactly one rank, dense and expert alike, so the squared
    norm is one all-reduce of the local sums, whatever mesh each parameter is on.
    """
    grads = [local_part(p.grad) for p in model.parameters() if p.grad is not None]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    device = grads[0].device
    squared = torch.zeros((), device=device, dtype=torch.float32)
    for g in grads:
        squared += torch.linalg.vector_norm(g.float()).square()
    dist.all_reduce(squared)
    norm = squared.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef)
    return norm


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state this rank holds (the local shards of sharded ones)."""
    total = 0
    for p in model.parameters():
        total += _nbytes(p) + (_nbytes(p.grad) if p.grad is not None else 0)
    for state in optimizer.state.values():
        total += sum(_nbytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    return total


def _nbytes(t: torch.Tensor) -> int:
    local = local_part(t)
    return local.numel() * local.element_size()
