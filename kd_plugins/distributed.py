"""Data-parallel and FSDP2 helpers for a training loop written with the core API (no Trainer).

The :class:`~kd_plugins.Distiller` is never part of the wrapped (DDP / FSDP) student: its projectors and scheduler
are replicated on every rank, and these helpers keep the replicas equal.

* :func:`cross_rank_mean` -- the ``reduce`` to pass to :meth:`Distiller.forward <kd_plugins.Distiller.forward>`:
  every rank's scheduler sees the rank-mean losses and probe gradients, so all compute the same weights and state.
* :func:`average_gradients` -- average the Distiller's gradients across ranks before the optimizer step (one
  collective; zeros where a rank has none).
* :func:`gather_sharded` -- the full tensor of a sharded FSDP2 parameter (a ``DTensor``) for a computation outside
  its module's forward, with its gradient reduce-scattered back as FSDP2 reduces its own: :class:`FeatureCapture
  <kd_plugins.capture.FeatureCapture>` uses it for the LM head the logit terms project.
* :func:`probe_parameters` -- the tensors a gradient-aware scheduler should differentiate (``shared_params``) under
  FSDP2, read after the forward, refusing parameters that are sharded at that point.
* :func:`clip_grad_norm_jointly` -- ``max_grad_norm`` over the sharded student and the replicated Distiller together
  (one norm: the student's over all shards, the Distiller's counted once).
* :func:`save_kd_state` -- the KD-state file, written once (rank 0), every rank waiting until it exists.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a module's parameters are ``DTensor`` shards outside its
forward; during the forward FSDP2 registers the all-gathered (unsharded) parameters on the module and, unless the
module was wrapped with ``reshard_after_forward=False`` (the root module never reshards after its forward), frees
them again right after. The LM head usually belongs to the root module, so after the student's forward
``lm_head.weight`` is the unsharded parameter and the logit terms use it as it is: its gradient is reduce-scattered
by FSDP2 at the end of the backward. A head wrapped in its own resharding unit is a ``DTensor`` again by the time
the loss runs; :func:`gather_sharded` all-gathers it once per step. Either way each rank holds the whole
``V x H`` head (and its gradient) for the step: the chunked losses need every vocabulary row for every chunk of
tokens (a vocabulary-parallel loss would avoid it; kd_plugins has none).

Imports only torch.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Iterable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from kd_plugins.distiller import Distiller

__all__ = ["average_gradients", "clip_grad_norm_jointly", "cross_rank_mean", "gather_sharded", "is_sharded", "probe_parameters",
           "save_kd_state", "world_size"]

KD_STATE_NAME = "kd_state.safetensors"


def world_size() -> int:
    """Ranks in the default process group; 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cross_rank_mean(tensor: Tensor, *, contributes: bool = True) -> Tensor:
    """All-reduce ``tensor`` (any shape) to its mean over the ranks that ``contribute``, in float64: one collective
    that also carries the count (a rank that skipped the transfer terms passes ``contributes=False`` and gets no
    weight). NaN where no rank contributed (schedulers ignore non-finite values). A collective: every rank calls it
    the same number of times, in the same order."""
    import torch.distributed as dist

    flat = torch.cat([tensor.detach().reshape(-1).to(torch.float64),
                      torch.ones(1, dtype=torch.float64, device=tensor.device)])
    if not contributes:
        flat.zero_()
    dist.all_reduce(flat)
    return (flat[:-1] / flat[-1]).to(tensor.dtype).view_as(tensor)


def average_gradients(module: nn.Module) -> None:
    """Average the gradients of ``module``'s trainable parameters across ranks, in place (the Distiller, which no
    DDP / FSDP wrapper sees). One collective over every trainable parameter, zeros where a rank has no gradient (it
    skipped the transfer terms), so every rank issues the same collective. Nothing in a single process."""
    import torch.distributed as dist

    world = world_size()
    params = [p for p in module.parameters() if p.requires_grad]
    if world == 1 or not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
        offset += param.numel()


def is_sharded(tensor: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter outside its module's forward)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def gather_sharded(tensor: Tensor) -> Tensor:
    """The full, local tensor of a ``DTensor``; any other tensor unchanged.

    Differentiable: the gradient of the full tensor is reduce-scattered back onto the shards and divided by the
    number of ranks -- the mean FSDP2 applies to the gradients of its own forward -- and accumulates into the
    sharded parameter's ``.grad`` beside FSDP2's. Costs one all-gather of the whole tensor (and, in the backward,
    one reduce-scatter of its gradient) per call: call it once per step.
    """
    if not is_sharded(tensor):
        return tensor
    from torch.distributed.tensor import Partial

    mesh = tensor.device_mesh
    if not (tensor.requires_grad and torch.is_grad_enabled()):
        return tensor.full_tensor()
    full = tensor.full_tensor(grad_placements=[Partial()] * mesh.ndim)
    ranks = mesh.size()
    full.register_hook(lambda grad: grad / ranks)
    return full


def probe_parameters(params: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    """The tensors to hand a gradient-aware scheduler as ``shared_params`` for this step, read now (after the
    student's forward): under FSDP2 those are the unsharded parameters the forward used.

    Raises:
        RuntimeError: one of them is sharded (a ``DTensor``) -- FSDP2 freed the unsharded parameters after the
            forward, so no gradient of the step's losses reaches them. Wrap the block that holds them with
            ``fully_shard(block, reshard_after_forward=False)`` or take them from the root module (e.g. the final
            norm).
    """
    tensors = list(params.parameters() if isinstance(params, nn.Module) else params)
    sharded = [tuple(p.shape) for p in tensors if is_sharded(p)]
    if sharded:
        raise RuntimeError(
            f"shared_params: {len(sharded)} of {len(tensors)} parameters are sharded by FSDP2 at this point (local "
            f"shapes {sharded[:3]}{'...' if len(sharded) > 3 else ''}): their module resharded after its forward, so "
            "the step's losses have no gradient with respect to them. Wrap that block with fully_shard(block, "
            "reshard_after_forward=False), or use parameters of the root module (e.g. the final norm)"
        )
    return tensors


def clip_grad_norm_jointly(sharded: Iterable[Tensor], replicated: Iterable[Tensor], max_norm: float, *,
                           sharded_norm: Tensor | None = None) -> Tensor:
    """Clip the gradients of a sharded student and of the replicated Distiller to one joint L2 norm; return the
    pre-clip norm (equal on every rank).

    ``torch.nn.utils.clip_grad_norm_`` cannot take both: the student's FSDP2 gradients are ``DTensor`` shards whose
    norm needs a collective, the Distiller's are plain tensors, identical on every rank once :func:`average_gradients`
    ran (counted once, not summed over ranks). The joint norm is ``sqrt(student**2 + distiller**2)`` and every
    gradient is scaled by ``min(1, max_norm / (norm + 1e-6))``, as ``clip_grad_norm_`` does.

    Args:
        sharded: the student's parameters (``DTensor`` or plain; their gradients' norm is global).
        replicated: the Distiller's parameters.
        max_norm: ``max_grad_norm``; ``inf`` only measures.
        sharded_norm: the student's global gradient norm when the caller has it already (FSDP1's
            ``model.clip_grad_norm_(inf)``, whose gradients are flat shards).
    """
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    sharded = [p for p in sharded if p.grad is not None]
    replicated = [p for p in replicated if p.grad is not None]
    norms = []
    if sharded_norm is not None:
        norms.append(torch.as_tensor(sharded_norm, dtype=torch.float32).reshape(()))
    elif sharded:
        norm = get_total_norm([p.grad for p in sharded])
        norms.append((norm.full_tensor() if is_sharded(norm) else norm).float())
    if replicated:
        norms.append(get_total_norm([p.grad for p in replicated]).float())
    if not norms:
        return torch.zeros(())
    device = norms[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
    if max_norm != float("inf"):
        for group in (sharded, replicated):
            if group:
                clip_grads_with_norm_(group, max_norm, total)
    return total


def save_kd_state(distiller: "Distiller", folder: str | os.PathLike) -> str:
    """Write ``folder/kd_state.safetensors`` (the Distiller's tensors, its resolved configuration and a checksum,
    see :mod:`kd_plugins.kd_state`) once: rank 0 writes it atomically (temporary file, then ``os.replace``), every
    rank waits at a barrier until it is there. Returns the path. The Distiller is replicated, so rank 0's copy is
    every rank's."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from kd_plugins.kd_state import state_metadata

    path = os.path.join(os.fspath(folder), KD_STATE_NAME)
    rank = dist.get_rank() if world_size() > 1 else 0
    if rank == 0:
        os.makedirs(os.fspath(folder), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kd_state.", suffix=".tmp", dir=os.fspath(folder))
        os.close(fd)
        try:
            tensors = distiller.kd_state_dict()
            save_file(tensors, tmp, metadata=state_metadata(distiller, tensors))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    if world_size() > 1:
        dist.barrier()
    return path
