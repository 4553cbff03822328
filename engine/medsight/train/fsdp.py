"""Sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

What gets sharded: the stage losses call several submodules directly (`mm_projector`, the input embedding,
`language_model`, `token_projection`, the perceiver's `decode`), so a single FSDP root over the MedSIGHT model would
leave most of them sharded when they run. Instead a `LossModule` whose `forward` *is* the stage loss becomes the
root, and every submodule the loss calls on its own is an FSDP unit of its own:

- each Qwen3 decoder layer (the official `fsdp_transformer_layer_cls_to_wrap`), all-gathered one at a time;
- `embed_tokens`, `mm_projector`, `token_projection` (called outside the language model's forward);
- the language model itself (what is left: final norm and `lm_head`);
- the root: the vision encoder, the perceiver and the codebook (frozen in stages 3-5; trained in stages 1-2,
  where they are small).

Precision (`MixedPrecisionPolicy`): the sharded parameters, gradients and optimizer states stay float32 (master
weights); each unit computes in `param_dtype` (bf16 on GPU by default; float32 on CPU, where bf16 kernels are
slow and parity tests want exact float32) and gradients are reduce-scattered in float32.

Checkpoints: `torch.distributed.checkpoint` (DCP) writes the sharded model and optimizer tensors, each rank its own
part, and reads them back into any world size, one process without torchrun included
(`load_sharded_into_one`). Only tensors go into DCP (its loader unpickles non-tensor values);
the optimizer's hyper-parameters, the step and each rank's RNG are JSON next to it (`medsight.train.state`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from medsight.model.loading import default_dtype

SHARDED_DIR = "sharded"  # the DCP folder inside a checkpoint
ROOT_PREFIX = "model."  # the LossModule root's prefix of the model's names in a sharded state
PARAM_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class Opaque:
    """Hands the batch to the root's forward untouched (FSDP's root moves and casts tensors it can see)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class LossModule(nn.Module):
    """The FSDP root: holds the model, and its forward is the stage loss (batch -> dict of scalar terms)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], dict[str, torch.Tensor]],
                 own_trainable: Sequence[str] = ()) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.own_trainable = tuple(own_trainable)  # names in `model` of the trainable parameters of the root unit

    def forward(self, batch: Opaque) -> dict[str, torch.Tensor]:
        terms = self.loss_fn(batch.value)
        if self.own_trainable and torch.is_grad_enabled():
            # FSDP2 reduce-scatters only the parameters that have a gradient on *this* rank. A trainable part that
            # one rank's samples skip (stage 2 routes each sample to its modality's codebook) would make the ranks'
            # collectives differ (gloo aborts: "Received data size doesn't match"; NCCL hangs). A zero-weighted
            # term gives each of them a (zero) gradient on every rank; `drop_unused_gradients` then gives back None
            # to those no rank used.
            touch = sum(self.model.get_parameter(n).sum() for n in self.own_trainable)
            terms = {**terms, "loss": terms["loss"] + 0.0 * touch}
        return terms


def resolve_param_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype of the FSDP units: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return default_dtype(device)
    if name not in PARAM_DTYPES:
        raise ValueError(f"unknown fsdp_param_dtype {name!r}; use auto, {', '.join(PARAM_DTYPES)}")
    return PARAM_DTYPES[name]


def init_process_group(device: torch.device) -> DeviceMesh:
    """Join the torchrun group (NCCL on CUDA, gloo on CPU) and return a 1-D mesh over all ranks."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return init_device_mesh(device.type, (dist.get_world_size(),))


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units of their own, innermost first (see the module docstring)."""
    lm = model.language_model
    inner = lm.model
    return [*inner.layers, inner.embed_tokens, inner.mm_projector, inner.token_projection, lm]


def shard(model: nn.Module, loss_fn: Callable[[Any], dict[str, torch.Tensor]], mesh: DeviceMesh,
          param_dtype: torch.dtype) -> LossModule:
    """Wrap `model` in a LossModule and shard it in place with `fully_shard` (per decoder layer, then the rest)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # What the stage left off the training device (stages 1-2: the language model, on the CPU) stays there, whole:
    # FSDP would otherwise move its shards to the GPUs.
    ignored = {p for p in model.parameters() if p.device.type != mesh.device_type}
    units = [unit for unit in fsdp_units(model) if any(p not in ignored for p in unit.parameters())]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    own = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_units]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    root = LossModule(model, loss_fn, own)
    fully_shard(root, mesh=mesh, mp_policy=policy, ignored_params=ignored)
    return root


def set_gradient_sync(root: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of an accumulated step."""
    if isinstance(root, FSDPModule):
        root.set_requires_gradient_sync(enabled)


def drop_unused_gradients(root: nn.Module) -> None:
    """After a step's backward (collective): set the gradient of each trainable parameter of the root unit that no
    rank used (all zero everywhere) back to None, so that the optimizer leaves it untouched as in one process (Adam
    would otherwise still apply its momentum to, e.g., a stage-2 codebook no sample of the step routed to)."""
    if not isinstance(root, LossModule) or not root.own_trainable:
        return
    params = [root.model.get_parameter(n) for n in root.own_trainable]
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
    device = next((g.device for g in grads if g is not None), params[0].device)
    used = torch.stack([torch.zeros((), device=device) if g is None else g.ne(0).any().float() for g in grads])
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    for param, flag in zip(params, used.tolist(), strict=True):
        if not flag:
            param.grad = None


def local_numel(module: nn.Module) -> tuple[int, int]:
    """(parameters this rank stores, parameters of the whole model)."""
    local = total = 0
    for p in module.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total


def mask_gradient(param: torch.Tensor, mask: torch.Tensor) -> None:
    """grad *= mask, where `mask` is a full (unsharded) tensor broadcastable to the full parameter."""
    if param.grad is None:
        return
    if isinstance(param.grad, DTensor):
        grad = param.grad
        mask = distribute_tensor(mask.to(grad.device, grad.dtype), grad.device_mesh, grad.placements)
        grad.mul_(mask)
    else:
        param.grad.mul_(mask.to(param.grad.device, param.grad.dtype))


def as_float(value: torch.Tensor) -> float:
    return float(value.full_tensor() if isinstance(value, DTensor) else value)


def only_trained(state: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """The entries of `module`'s state dict that it trains (a LoRA run's adapter and other trainables, not the frozen
    base its init_from holds)."""
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def gathered_trained(root: nn.Module) -> dict[str, torch.Tensor]:
    """On rank 0, the trained parameters whole, in CPU memory, by the MedSIGHT model's names; on the other ranks {}
    (collective: each is gathered from its shards on every rank, one at a time, and kept by rank 0 only, which writes
    them: a non_lora_trainables entry such as embed_tokens is GiBs whole)."""
    keep = dist.get_rank() == 0
    whole = {}
    for name, p in root.named_parameters():
        if p.requires_grad:
            gathered = p.full_tensor() if isinstance(p, DTensor) else p
            if keep:
                whole[name.removeprefix(ROOT_PREFIX)] = gathered.detach().cpu()
    return whole


def save_sharded(folder: Path, root: nn.Module, optimizer: torch.optim.Optimizer,
                 trained_only: bool = False) -> list[dict[str, Any]]:
    """Write model and optimizer tensors with DCP (collective); returns the optimizer's param groups (plain).
    `trained_only`: of the model only what it trains (`only_trained`)."""
    model_state, optim_state = get_state_dict(root, optimizer)
    if trained_only:
        model_state = only_trained(model_state, root)
    dcp.save({"model": model_state, "optimizer": optim_state["state"]}, checkpoint_id=str(folder / SHARDED_DIR))
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
            for group in optim_state["param_groups"]]


#: set_state_dict's options for `saved_moments`: the model's state is whole (DCP checks it), the moments may not be.
PARTIAL_MOMENTS = StateDictOptions(strict=False)


def saved_moments(folder: Path, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer target (name -> moments) restricted to the parameters whose moments the checkpoint holds.
    get_state_dict creates moments for every parameter of a fresh optimizer, but a parameter no step gave a gradient
    (one the forward never uses, such as the perceiver's region_position_embed, or a codebook no sample was routed
    to: `drop_unused_gradients`) had none when saved, and DCP refused the whole checkpoint for it ("Missing key in
    checkpoint state_dict"). Left out, such a parameter has no moments after the load, as in the run that saved."""
    saved = dcp.FileSystemReader(str(folder / SHARDED_DIR)).read_metadata().state_dict_metadata
    return {name: moments for name, moments in optimizer_state.items()
            if all(f"optimizer.{name}.{key}" in saved for key in moments)}


def load_sharded(folder: Path, root: nn.Module, optimizer: torch.optim.Optimizer,
                 param_groups: list[dict[str, Any]], trained_only: bool = False) -> None:
    """Read what `save_sharded` wrote into the sharded model and optimizer (collective); `trained_only`: as saved."""
    # get_state_dict gives the target layout (it creates the optimizer moments of a fresh optimizer first).
    model_state, optim_state = get_state_dict(root, optimizer)
    if trained_only:
        model_state = only_trained(model_state, root)
    target = {"model": model_state, "optimizer": saved_moments(folder, optim_state["state"])}
    dcp.load(target, checkpoint_id=str(folder / SHARDED_DIR))
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in param_groups]
    set_state_dict(root, optimizer, model_state_dict=target["model"],
                   optim_state_dict={"state": target["optimizer"], "param_groups": groups}, options=PARTIAL_MOMENTS)


def load_sharded_into_one(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                          param_groups: list[dict[str, Any]], trained_only: bool = False) -> None:
    """Read what `save_sharded` wrote into an unsharded model and optimizer in one process (no process group: DCP
    reads any world size, one included). The sharded run's names carry the LossModule root's `model.` prefix."""
    model_state, optim_state = get_state_dict(model, optimizer)
    if trained_only:
        model_state = only_trained(model_state, model)
    target = {"model": {ROOT_PREFIX + k: v for k, v in model_state.items()},
              "optimizer": saved_moments(folder, {ROOT_PREFIX + k: v for k, v in optim_state["state"].items()})}
    dcp.load(target, checkpoint_id=str(folder / SHARDED_DIR))

    def unprefixed(state: dict[str, Any]) -> dict[str, Any]:
        return {k.removeprefix(ROOT_PREFIX): v for k, v in state.items()}

    groups = [{**g, "betas": tuple(g["betas"]), "params": [n.removeprefix(ROOT_PREFIX) for n in g["params"]]}
              for g in param_groups]
    set_state_dict(model, optimizer, model_state_dict=unprefixed(target["model"]),
                   optim_state_dict={"state": unprefixed(target["optimizer"]), "param_groups": groups},
                   options=PARTIAL_MOMENTS)


def gathered_state(root: LossModule) -> dict[str, torch.Tensor]:
    """The full model state dict on rank 0, in CPU memory (collective; other ranks get an empty dict).

    Keys are the MedSIGHT model's own (the LossModule's `model.` prefix removed).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(root, options=options)
    return {k.removeprefix(ROOT_PREFIX): v for k, v in state.items()}

