"""The data contracts between captures, transfer terms, schedulers and the Distiller.

Layer indices: ``i`` names the *output* of decoder block ``i`` (0-based); negative indices count from the end
(``-1`` is the last block's output, before the final norm). ``final_hidden`` is the final-norm output that the
LM head consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelInfo:
    """The shape facts of one model that builders need (no weights).

    Build with :meth:`from_config` from any Hugging Face style config object (duck-typed: no transformers
    import).
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    name: str = "model"

    @classmethod
    def from_config(cls, config: Any, name: str = "model") -> "ModelInfo":
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        hidden = int(config.hidden_size)
        heads = int(getattr(config, "num_attention_heads", 1) or 1)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        return cls(
            hidden_size=hidden,
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=kv,
            head_dim=int(head_dim),
            vocab_size=int(config.vocab_size),
            name=name,
        )

    def resolve_layer(self, index: int) -> int:
        """Turn a possibly negative layer index into ``0..num_layers-1``; raise ``IndexError`` if out of range."""
        resolved = index + self.num_layers if index < 0 else index
        if not 0 <= resolved < self.num_layers:
            raise IndexError(
                f"layer {index} is out of range for {self.name} with {self.num_layers} layers "
                f"(allowed: {-self.num_layers}..{self.num_layers - 1})"
            )
        return resolved


@dataclass
class Requirements:
    """What a term needs captured. Layer indices are resolved (non-negative)."""

    student_layers: set[int] = field(default_factory=set)
    teacher_layers: set[int] = field(default_factory=set)
    student_qkv_layers: set[int] = field(default_factory=set)
    teacher_qkv_layers: set[int] = field(default_factory=set)
    final_hidden: bool = False  # final hidden states + LM head of both models

    def merge(self, other: "Requirements") -> "Requirements":
        return Requirements(
            self.student_layers | other.student_layers,
            self.teacher_layers | other.teacher_layers,
            self.student_qkv_layers | other.student_qkv_layers,
            self.teacher_qkv_layers | other.teacher_qkv_layers,
            self.final_hidden or other.final_hidden,
        )


@dataclass
class ModelCapture:
    """Tensors captured from one forward pass of one model.

    Attributes:
        hidden_states: ``{layer: (B, T, H)}`` block outputs.
        qkv: ``{layer: (q, k, v)}`` projection outputs, ``q: (B, T, n_heads*head_dim)``,
            ``k, v: (B, T, n_kv_heads*head_dim)`` (before RoPE).
        final_hidden: ``(B, T, H)`` final-norm output.
        lm_head_weight: ``(V, H)``; ``lm_head_bias``: ``(V,)`` or None.
        logit_scale: multiplier applied to logits by the model (1.0 for Llama/Qwen).
        logit_softcap: final-logit soft-capping value, or None.
        info: the model's :class:`ModelInfo`.
        topk_logprobs / topk_indices: ``(B, T, k)`` when the teacher comes from an offline cache instead of a
            live forward (then ``final_hidden`` is None).
    """

    info: ModelInfo
    hidden_states: dict[int, Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[Tensor, Tensor, Tensor]] = field(default_factory=dict)
    final_hidden: Tensor | None = None
    lm_head_weight: Tensor | None = None
    lm_head_bias: Tensor | None = None
    logit_scale: float = 1.0
    logit_softcap: float | None = None
    topk_logprobs: Tensor | None = None
    topk_indices: Tensor | None = None


@dataclass
class BatchContext:
    """Per-batch facts shared by all terms.

    Attributes:
        labels: ``(B, T)`` next-token targets *aligned with positions*: ``labels[b, t]`` is the token that
            position ``t`` predicts (the Hugging Face causal-LM labels shifted left by one, see
            :func:`kd_plugins.functional.shift_labels`); ``ignore_index`` where no target.
        token_mask: ``(B, T)`` bool, True for real (non-padding) tokens; alignment terms use it.
        sequence_ids: ``(B, T)`` long, the packed-sequence id of each token (all zeros for unpacked rows,
            ``-1`` on padding). Relation terms never relate tokens with different ids.
        num_items_in_batch: normaliser for logit terms (the host trainer's count of target tokens over the
            whole gradient-accumulation step and all ranks), or None to use this batch's count.
        step: the optimisation step.
        num_tokens_in_batch: normaliser for token-mean alignment terms (``mse``, ``cosine``,
            ``attention_relation``; terms with ``normalized_by_num_tokens = True``): the count of valid
            (``token_mask``) tokens over the whole gradient-accumulation step (and all ranks when the host averages
            tokens across devices), so they weigh every token alike however the batch is split. None: this
            batch's own count (a per-micro-batch mean).
    """

    labels: Tensor
    token_mask: Tensor
    sequence_ids: Tensor
    num_items_in_batch: Tensor | int | None = None
    step: int = 0
    ignore_index: int = -100
    num_tokens_in_batch: Tensor | int | None = None

    @classmethod
    def from_inputs(
        cls,
        *,
        labels: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        step: int = 0,
        ignore_index: int = -100,
        num_tokens_in_batch: Tensor | int | None = None,
    ) -> "BatchContext":
        """Build from a Hugging Face causal-LM batch (HF label convention: unshifted).

        Packed / padding-free batches are recognised by ``position_ids`` restarting at 0 inside a row.
        Without labels, every next real token is a target.
        """
        from kd_plugins.functional import shift_labels  # local: functional imports this module

        reference = labels if labels is not None else input_ids
        if reference is None:
            raise ValueError("BatchContext.from_inputs needs labels or input_ids")
        if attention_mask is not None:
            token_mask = attention_mask.bool()
        else:
            token_mask = torch.ones_like(reference, dtype=torch.bool)
        if labels is None:
            labels = input_ids.masked_fill(~token_mask, ignore_index)
        if position_ids is not None:
            starts = position_ids == 0
            starts[:, 0] = True
            sequence_ids = torch.cumsum(starts.long(), dim=1) - 1
        else:
            sequence_ids = torch.zeros_like(reference, dtype=torch.long)
        sequence_ids = sequence_ids.masked_fill(~token_mask, -1)
        shifted = shift_labels(labels, ignore_index=ignore_index)
        if position_ids is not None:
            # the last token of a packed sequence must not predict the first token of the next one
            next_seq = torch.nn.functional.pad(sequence_ids[:, 1:], (0, 1), value=-1)
            shifted = shifted.masked_fill(next_seq != sequence_ids, ignore_index)
        return cls(
            labels=shifted,
            token_mask=token_mask,
            sequence_ids=sequence_ids,
            num_items_in_batch=num_items_in_batch,
            step=step,
            ignore_index=ignore_index,
            num_tokens_in_batch=num_tokens_in_batch,
        )


class Normalizer(str, Enum):
    """What a transfer term's value is a mean over, so a host can scale it like its own loss.

    * ``ITEMS``: a token *sum* divided by ``BatchContext.num_items_in_batch`` -- the host trainer's count of target
      tokens over the whole gradient-accumulation window (and all ranks when it averages tokens across devices),
      exactly like the host's cross-entropy. The built-in logit terms.
    * ``TOKENS``: a token sum divided by ``BatchContext.num_tokens_in_batch`` -- the valid (``token_mask``) tokens of
      the whole window, so every token weighs the same however the window is split. ``mse``, ``cosine``,
      ``attention_relation``.
    * ``BATCH``: a mean over this micro-batch, whatever it holds (the default; ``contrastive``, whose negatives are
      the other tokens of the micro-batch, is one). Under gradient accumulation the host divides it by the number of
      accumulation steps.

    A term receives exactly the normaliser it declares: an ``ITEMS`` term's batch carries ``num_items_in_batch`` when
    the host scales for accumulation (else None: a per-micro-batch mean), a ``TOKENS`` term's carries
    ``num_tokens_in_batch``, and a ``BATCH`` term's carries neither.
    """

    ITEMS = "items"
    TOKENS = "tokens"
    BATCH = "batch"


class DistillationTerm(nn.Module):
    """Base class of transfer terms (logit or alignment).

    A term owns its trainable parts (projectors, learnable temperatures). ``forward`` returns a 0-dim fp32
    loss, finite, and exactly 0 when nothing is valid in the batch.

    Declared traits (class attributes; a subclass overrides what differs from the default). A host plans a step
    from these alone, so a third party's term is planned exactly like a built-in:

    Attributes:
        family: ``"logit"`` or ``"alignment"``: the registry family (informational; set by the built-in bases).
        normalizer: a :class:`Normalizer` -- what the loss is a mean over (default ``BATCH``: a per-micro-batch
            mean). Declare ``TOKENS`` for a token mean that divides by ``batch.num_tokens_in_batch`` when it is given,
            ``ITEMS`` for a token sum over ``batch.num_items_in_batch`` like the host's cross-entropy.
        carries_task_loss: the term can compute the student's causal-LM cross-entropy in its own pass over the LM
            head (default False). Such a term implements :meth:`forward_with_task_loss`; a host then runs the
            student's backbone only and takes the CE from the term (``KDConfig.fuse_task_loss``).
    """

    family: str = ""
    normalizer: Normalizer = Normalizer.BATCH
    carries_task_loss: bool = False

    def requirements(self) -> Requirements:
        return Requirements()

    def forward(self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext) -> Tensor:  # noqa: D401
        raise NotImplementedError

    def forward_with_task_loss(
        self, student: ModelCapture, teacher: ModelCapture, batch: BatchContext, *, task_grad_ratio: float | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(loss, task_loss)``: this term's loss, as :meth:`forward` returns it, and the student's causal-LM
        cross-entropy on ``batch.labels`` (temperature 1, the model's own logits, normalised like a logit term:
        token sum over ``batch.num_items_in_batch``, or the mean over valid positions when it is None).

        ``task_grad_ratio``: None, or the caller's promise that the two values are used only as
        ``a * loss + a * task_grad_ratio * task_loss`` (any ``a``), so a fused implementation may add the CE's logit
        gradient to the term's before projecting both through the LM head once. Only terms with
        ``carries_task_loss = True`` implement this.
        """
        raise NotImplementedError(f"{type(self).__name__} does not carry the task loss (carries_task_loss = False)")

    def extra_metrics(self) -> dict[str, float]:
        """Optional scalars to log beside the loss (e.g. a learned temperature)."""
        return {}


@runtime_checkable
class TeacherSource(Protocol):
    """Where the teacher's tensors of a batch come from: a live model, a PEFT student's own base (adapters off), or
    an offline cache -- one contract, so a trainer has no per-source branches.

    * ``info``: the teacher's :class:`ModelInfo`;
    * ``prepare(requirements)``: check, before training starts, that the source can serve ``requirements`` (and set up
      whatever it needs, e.g. forward hooks); raises a :class:`~kd_plugins.KDError` naming the problem otherwise;
    * ``capture(inputs, requirements)``: the :class:`ModelCapture` of a causal-LM batch (the same keys the student
      gets: ``input_ids`` plus ``attention_mask`` or padding-free ``position_ids``/``cu_seq_lens_*``), holding what
      ``requirements`` asks for, computed without gradient.
    """

    @property
    def info(self) -> ModelInfo: ...

    def prepare(self, requirements: Requirements) -> None: ...

    def capture(self, inputs: Mapping[str, Any], requirements: Requirements) -> ModelCapture: ...


class WeightScheduler(nn.Module):
    """Base class of transfer-weight schedulers.

    Contract: each step the Distiller calls ``weights(step=..., losses=..., gradients=...)`` and gets
    ``{term: weight}`` (floats or 0-dim tensors; a tensor with ``requires_grad`` lets a scheduler learn through
    the loss, as uncertainty weighting does). ``losses`` are *detached* 0-dim values (``{term: loss}``), already
    averaged across data-parallel ranks when the Distiller was given a ``reduce``; a scheduler must not
    backpropagate through them. ``gradients`` is None unless ``needs_gradients(step)`` returned True for this
    step; then it is a :class:`GradientProbe` giving per-term gradients on a small shared parameter set, computed
    with ``torch.autograd.grad`` (no second backward of the whole model) -- the only way gradients reach a
    scheduler.

    Under data parallelism every rank must call the probe for the same names in the same order (the probe's
    ``reduce`` is a collective): decide what to probe from the scheduler's state, the step and values already
    returned by the probe or found in ``losses``, never from anything rank-local.

    State is the module's ``state_dict()`` (buffers and parameters).

    Declared traits (class attributes, like :class:`DistillationTerm`'s):

    Attributes:
        reads_task_loss: whether the weights depend on the host's task (CE) loss -- its gradient in the probe
            (``gradients.grad("task")``), as ``conflict`` does. Default True (the safe choice: the host computes its
            CE every step). A scheduler that never reads it declares False, so that with ``ce_weight: 0`` a host can
            run the student's backbone only, without the LM head and its cross-entropy.
    """

    reads_task_loss: bool = True

    def needs_gradients(self, step: int) -> bool:
        return False

    def weights(
        self, *, step: int, losses: Mapping[str, Tensor], gradients: "GradientProbe | None" = None
    ) -> dict[str, float | Tensor]:
        raise NotImplementedError

    def weights_in_advance(self, step: int) -> dict[str, float] | None:
        """The weights :meth:`weights` will return at ``step``, when they are known before this step's losses and
        gradients; None (the default) when they are not.

        Optional, and only an optimisation: with ``task_loss="fused"`` the Distiller uses the carrier term's
        weight to add the CE gradient to the KD gradient before both are projected through the student's LM
        head (two head-sized matmuls per step fewer). It checks afterwards that :meth:`weights` returned the
        announced weight and raises if not. Step-based ramps know their weights; the adaptive schedulers know
        them on every step that is not an update step.
        """
        return None

    def metrics(self) -> dict[str, float]:
        """Optional scalars to log (e.g. gradient norms)."""
        return {}

    def regularizer(self, *, step: int) -> Tensor | None:
        """An extra loss the Distiller adds to ``transfer`` at ``step`` (after :meth:`weights` for that step).

        ``None`` (the default) adds nothing. A scheduler whose weights are learned through the loss uses it to keep
        them from collapsing to zero (uncertainty weighting adds ``sum_i s_i``, the log-variances). Compute it from
        the scheduler's parameters and ``step`` alone. It counts once per optimizer step: under gradient accumulation
        the step plan scales it (``StepPlan.regularizer_scale``: ``1 / accumulation steps`` when the host does not
        divide its loss by the accumulation steps afterwards).
        """
        return None


class GradientProbe:
    """Lazily computes per-term gradients on a shared parameter set.

    ``grad(name)`` returns the flattened gradient of the *unweighted* loss of term ``name`` (or ``"task"``
    for the host's CE loss) with respect to ``params``, computed once and cached.

    Args:
        losses: ``{name: loss}`` attached to the graph (a loss without gradient gives a zero gradient).
        params: the shared parameters; those without ``requires_grad`` are left out.
        reduce: optional callable ``tensor -> tensor`` applied to each flattened gradient before it is cached,
            e.g. a mean across data-parallel ranks. It is a collective then: it runs once per ``grad(name)``
            that misses the cache, also for a loss without gradient (zeros), so ranks call it identically as
            long as they ask for the same names in the same order.
    """

    def __init__(
        self, losses: Mapping[str, Tensor], params: list[Tensor], reduce: Callable[[Tensor], Tensor] | None = None
    ):
        self._losses = dict(losses)
        self._params = [p for p in params if p.requires_grad]
        self._reduce = reduce
        self._cache: dict[str, Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self._losses)

    def grad(self, name: str) -> Tensor:
        if name not in self._cache:
            loss = self._losses[name]
            if not self._params:
                raise RuntimeError("GradientProbe has no trainable shared parameters")
            if not loss.requires_grad:
                flat = torch.zeros(sum(p.numel() for p in self._params), device=loss.device)
            else:
                grads = torch.autograd.grad(loss, self._params, retain_graph=True, allow_unused=True)
                flat = torch.cat(
                    [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, self._params)]
                )
            self._cache[name] = flat if self._reduce is None else self._reduce(flat)
        return self._cache[name]

    def norm(self, name: str) -> Tensor:
        return self.grad(name).norm()
