"""Capture what transfer terms need from a model's own forward pass, with forward hooks.

The host trainer runs the student forward however it likes (TRL's fused LM head returns neither logits nor
hidden states); :class:`FeatureCapture` listens on the decoder blocks, the ``q/k/v`` projections and the final
norm, and reads the LM head weights, so no second student forward and no full ``B x T x V`` logits are needed.
:func:`run_backbone` runs a model without its LM head, through its own forward (so DDP / FSDP / PEFT wrappers see
it): the teacher forward, and the student's when the logit terms project its head themselves.

Supported module layouts (:data:`SUPPORTED_ARCHITECTURES`; anything else is refused with this list):

* **Llama style** -- ``get_decoder().layers[i]`` blocks, ``.self_attn.{q,k,v}_proj`` projections and the final norm
  ``get_decoder().norm`` (Llama, Qwen2 and the many decoders laid out like them). A fused q/k/v projection
  (``qkv_proj``, ``query_key_value``, ``W_pack``, ``Wqkv``) serves hidden-state and logit terms, not attention
  relations (its layout is model-specific).
* **GPT-2** (``model_type: gpt2``) -- ``transformer.h[i]`` blocks, the final norm ``transformer.ln_f``, and the fused
  ``attn.c_attn`` (a ``Conv1D`` whose output is q, k and v side by side), split by width for attention relations.

PEFT wrappers are unwrapped with ``get_base_model()``. Imports torch only.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from kd_plugins.errors import IncompatibleModelsError
from kd_plugins.types import ModelCapture, ModelInfo

# Keys of a causal-LM batch the decoder backbone understands; everything else (labels, loss kwargs, the fused
# head switch) is dropped before the backbone forward.
BACKBONE_INPUT_KEYS = (
    "input_ids",
    "inputs_embeds",
    "attention_mask",
    "position_ids",
    "token_type_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "seq_idx",
)

_FUSED_QKV_NAMES = ("qkv_proj", "c_attn", "query_key_value", "Wqkv", "W_pack")

SUPPORTED_ARCHITECTURES = (
    "Llama style (e.g. Llama, Qwen2): decoder blocks at get_decoder().layers, attention projections "
    "layers[i].self_attn.{q,k,v}_proj, final norm get_decoder().norm",
    "GPT-2 (model_type gpt2): decoder blocks at transformer.h, fused attention projection h[i].attn.c_attn (split "
    "into q, k, v by width), final norm transformer.ln_f",
)

# model_type -> the fused q/k/v projection whose output is [q | k | v] side by side (widths from the ModelInfo)
_SPLITTABLE_QKV = {"gpt2": "c_attn"}


class FeatureCapture:
    """Forward hooks that record hidden states, q/k/v projections and the final hidden state of one model.

    Args:
        model: a Hugging Face style causal LM (or a PEFT model wrapping one).
        info: the model's :class:`ModelInfo` (resolves negative layer indices; stored in the capture).
        layers: block indices whose outputs to keep (``i`` = output of decoder block ``i``).
        qkv_layers: block indices whose ``q_proj``/``k_proj``/``v_proj`` outputs to keep.
        final_hidden: keep the final-norm output and read the LM head.

    The LM head is read as its first ``info.vocab_size`` rows: a model whose head is padded beyond the vocabulary
    both models share (same tokenizer, configs padded to different sizes) gives the logit terms only the shared
    real tokens, never the padding rows.

    Hooks record only inside :meth:`recording`; each ``recording()`` starts empty. Call :meth:`remove` to
    detach the hooks.

    Raises:
        IncompatibleModelsError: the model does not have a supported module layout (the message names the module
            path that was expected and lists :data:`SUPPORTED_ARCHITECTURES`), q/k/v are asked of a fused projection
            whose layout is unknown, or its LM head has fewer rows than ``info.vocab_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        info: ModelInfo,
        layers: Iterable[int] = (),
        qkv_layers: Iterable[int] = (),
        final_hidden: bool = False,
    ):
        self.model = model
        self.info = info
        self.layers = sorted({info.resolve_layer(i) for i in layers})
        self.qkv_layers = sorted({info.resolve_layer(i) for i in qkv_layers})
        self.final_hidden = bool(final_hidden)
        self._active = False
        self._hidden: dict[int, Tensor] = {}
        self._qkv: dict[int, dict[str, Tensor]] = {}
        self._final: Tensor | None = None
        self._handles: list[Any] = []

        base = unwrap_model(model)
        decoder, prefix = find_decoder(base)
        blocks, blocks_path = decoder_blocks(decoder, prefix, name=info.name)
        if len(blocks) < info.num_layers:
            raise IncompatibleModelsError(
                f"{info.name}: config says {info.num_layers} layers but '{blocks_path}' has {len(blocks)}"
            )
        for index in self.layers:
            self._handles.append(blocks[index].register_forward_hook(self._block_hook(index)))
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        for index in self.qkv_layers:
            self._hook_qkv(blocks[index], f"{blocks_path}.{index}", index, model_type)
        self._vocab_rows: int | None = None
        if self.final_hidden:
            norm, norm_path = final_norm(decoder, prefix, name=info.name)
            head = base.get_output_embeddings()
            if head is None:
                raise IncompatibleModelsError(f"{info.name}: {type(base).__name__} has no output embeddings (LM head)")
            rows = lm_head_parameters(head)[0].shape[0]
            if rows < info.vocab_size:
                raise IncompatibleModelsError(
                    f"{info.name}: its LM head has {rows} rows, fewer than the {info.vocab_size}-token vocabulary the "
                    "logit terms compare"
                )
            # a padded vocabulary restricted to the tokens both models share: the terms never see the padding rows
            self._vocab_rows = info.vocab_size if rows > info.vocab_size else None
            self._handles.append(norm.register_forward_hook(self._final_hook))

    def _hook_qkv(self, block: nn.Module, block_path: str, index: int, model_type: str | None) -> None:
        attention, path = None, f"{block_path}.self_attn"
        for name in ("self_attn", "attn"):
            if isinstance(getattr(block, name, None), nn.Module):
                attention, path = getattr(block, name), f"{block_path}.{name}"
                break
        if attention is None:
            raise IncompatibleModelsError(f"{self.info.name}: expected an attention module at '{path}'; "
                                          f"{_supported()}")
        splittable = _SPLITTABLE_QKV.get(model_type)
        fused_names = [n for n in _FUSED_QKV_NAMES if hasattr(attention, n)]
        if fused_names and splittable not in fused_names:
            raise IncompatibleModelsError(
                f"{self.info.name}: '{path}.{fused_names[0]}' is a fused q/k/v projection whose layout kd_plugins "
                f"does not know for model_type {model_type!r}; attention relation transfer needs separate "
                f"'{path}.q_proj', '{path}.k_proj' and '{path}.v_proj' (hidden-state and logit terms work). "
                f"{_supported()}"
            )
        if all(isinstance(getattr(attention, f"{w}_proj", None), nn.Module) for w in "qkv"):
            for which in ("q", "k", "v"):
                projection = getattr(attention, f"{which}_proj")
                self._handles.append(projection.register_forward_hook(self._qkv_hook(index, which)))
            return
        if splittable is not None and isinstance(getattr(attention, splittable, None), nn.Module):
            fused = getattr(attention, splittable)
            q_width = self.info.num_heads * self.info.head_dim
            kv_width = self.info.num_kv_heads * self.info.head_dim
            widths = (q_width, kv_width, kv_width)
            out = _output_width(fused)
            if out != sum(widths):
                raise IncompatibleModelsError(
                    f"{self.info.name}: '{path}.{splittable}' has {out} output features, not the q/k/v widths "
                    f"{widths} of {self.info.num_heads} heads ({self.info.num_kv_heads} key/value heads) x "
                    f"{self.info.head_dim}; attention relation transfer cannot split it"
                )
            self._handles.append(fused.register_forward_hook(self._fused_qkv_hook(index, widths)))
            return
        missing = [f"{path}.{w}_proj" for w in "qkv" if getattr(attention, f"{w}_proj", None) is None]
        raise IncompatibleModelsError(f"{self.info.name}: expected projections at {missing}; {_supported()}")

    # --- public API ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def recording(self) -> Iterator["FeatureCapture"]:
        """Record while inside the block; previous records are cleared on entry."""
        self.clear()
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    def result(self) -> ModelCapture:
        """The tensors recorded by the last :meth:`recording` block, as a :class:`ModelCapture`."""
        missing = [i for i in self.layers if i not in self._hidden]
        missing += [i for i in self.qkv_layers if len(self._qkv.get(i, {})) != 3]
        if missing or (self.final_hidden and self._final is None):
            raise RuntimeError(
                f"{self.info.name}: the forward pass did not reach every hooked module (missing layers {missing}, "
                f"final hidden {'missing' if self.final_hidden and self._final is None else 'ok'}); was it run "
                "inside FeatureCapture.recording()?"
            )
        capture = ModelCapture(
            info=self.info,
            hidden_states=dict(self._hidden),
            qkv={i: (d["q"], d["k"], d["v"]) for i, d in self._qkv.items()},
        )
        if self.final_hidden:
            head = unwrap_model(self.model).get_output_embeddings()
            capture.final_hidden = self._final
            weight, bias = lm_head_parameters(head)
            if self._vocab_rows is not None:
                weight = weight[: self._vocab_rows]
                bias = None if bias is None else bias[: self._vocab_rows]
            capture.lm_head_weight, capture.lm_head_bias = weight, bias
            capture.logit_scale, capture.logit_softcap = logit_postprocessing(self.model)
        return capture

    def clear(self) -> None:
        self._hidden, self._qkv, self._final = {}, {}, None

    def remove(self) -> None:
        """Detach every hook and drop the records."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    # --- hooks --------------------------------------------------------------------------------------------

    def _block_hook(self, index: int):
        def hook(module, args, output):
            if self._active:
                self._hidden[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _qkv_hook(self, index: int, which: str):
        def hook(module, args, output):
            if self._active:
                self._qkv.setdefault(index, {})[which] = output

        return hook

    def _fused_qkv_hook(self, index: int, widths: tuple[int, int, int]):
        def hook(module, args, output):
            if self._active:
                q, k, v = output.split(widths, dim=-1)
                self._qkv[index] = {"q": q, "k": k, "v": v}

        return hook

    def _final_hook(self, module, args, output):
        if self._active:
            self._final = output[0] if isinstance(output, (tuple, list)) else output


def run_backbone(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    """Run ``model`` without its LM head (no logits) and return the decoder's last hidden state (after the final
    norm).

    The forward goes through the model's own ``forward`` -- so a DDP / FSDP / PEFT wrapper sees it (DDP synchronises
    gradients only for a forward that ran through it) -- with ``logits_to_keep`` an empty index tensor: the LM head
    projects no position. A model whose forward takes no ``logits_to_keep`` runs its decoder directly, which is
    refused for a wrapped model.

    ``inputs`` is a causal-LM batch; labels and loss keywords are dropped, padding-free keys (``position_ids``,
    ``cu_seq_lens_q/k``, ``max_length_q/k``) are passed through. Call it under ``torch.no_grad()`` for a teacher.
    """
    base = unwrap_model(model)
    decoder, path = find_decoder(base)
    kwargs = {k: inputs[k] for k in BACKBONE_INPUT_KEYS if inputs.get(k) is not None}
    if _accepts_logits_to_keep(base):
        recorded: list[Tensor] = []
        handle = decoder.register_forward_hook(lambda module, args, output: recorded.append(_last_hidden(output)))
        reference = next(iter(kwargs.values()), None)
        nothing = torch.empty(0, dtype=torch.long, device=None if reference is None else reference.device)
        try:
            model(**kwargs, use_cache=False, logits_to_keep=nothing)
        finally:
            handle.remove()
        return recorded[-1]
    if base is not model:
        raise IncompatibleModelsError(
            f"{type(base).__name__}.forward has no 'logits_to_keep' argument, so its backbone can only run by calling "
            f"'{path}' directly -- which bypasses the {type(model).__name__} wrapper (DDP would not synchronise "
            "gradients). Set fuse_task_loss: false in the KD config to run the model's own loss instead"
        )
    return _last_hidden(decoder(**kwargs, use_cache=False))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip PEFT (``get_base_model``) and DDP-style (``.module``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module) and not hasattr(model, "config"):
            model = model.module
    return model


def find_decoder(model: nn.Module) -> tuple[nn.Module, str]:
    """Return ``(decoder, dotted path)`` of a causal LM's decoder backbone."""
    decoder = None
    if hasattr(model, "get_decoder"):
        try:
            decoder = model.get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
    if decoder is None or decoder is model:
        decoder = getattr(model, "model", None)
    if decoder is None:
        raise IncompatibleModelsError(
            f"expected a decoder backbone at 'model' (or get_decoder()) in {type(model).__name__}; {_supported()}"
        )
    path = next((name for name, module in model.named_modules() if module is decoder), "model") or "model"
    return decoder, path


def decoder_blocks(decoder: nn.Module, prefix: str = "model", *, name: str = "model") -> tuple[nn.ModuleList, str]:
    """``(blocks, dotted path)`` of a decoder's block list (``layers``, or GPT-2's ``h``); raises
    :class:`~kd_plugins.IncompatibleModelsError` listing the supported architectures otherwise."""
    for attribute in ("layers", "h"):
        blocks = getattr(decoder, attribute, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks, f"{prefix}.{attribute}"
    raise IncompatibleModelsError(
        f"{name}: expected the decoder blocks at '{prefix}.layers' (or '{prefix}.h') in {type(decoder).__name__}; "
        f"this architecture is not supported by FeatureCapture. {_supported()}"
    )


def final_norm(decoder: nn.Module, prefix: str = "model", *, name: str = "model") -> tuple[nn.Module, str]:
    """``(module, dotted path)`` of the decoder's final norm (``norm``, or GPT-2's ``ln_f``)."""
    for attribute in ("norm", "ln_f"):
        module = getattr(decoder, attribute, None)
        if isinstance(module, nn.Module):
            return module, f"{prefix}.{attribute}"
    raise IncompatibleModelsError(
        f"{name}: expected the final norm at '{prefix}.norm' (or '{prefix}.ln_f') in {type(decoder).__name__}. "
        f"{_supported()}"
    )


def _supported() -> str:
    return "Supported architectures: " + "; ".join(SUPPORTED_ARCHITECTURES) + "."


def _output_width(module: nn.Module) -> int:
    """Output features of a linear layer: ``nn.Linear`` stores ``(out, in)``, GPT-2's ``Conv1D`` ``(in, out)``."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    out = getattr(module, "nf", None)
    return int(out) if out is not None else int(weight.shape[-1])


def logit_postprocessing(model: nn.Module) -> tuple[float, float | None]:
    """``(logit_scale, final_logit_softcapping)`` as the model applies them to its logits (like TRL reads them)."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return 1.0, None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
    softcap = getattr(config, "final_logit_softcapping", None)
    return (1.0 if scale is None else float(scale)), (None if softcap is None else float(softcap))


def lm_head_parameters(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` the LM head applies right now.

    A PEFT LoRA-wrapped head (``base_layer`` + ``get_delta_weight``) contributes its active, unmerged adapters,
    so logit terms see the same head as the model's own forward (nothing when adapters are disabled, as for a
    ``self`` teacher -- read the head inside the teacher's forward context).
    """
    base = getattr(head, "base_layer", None)
    if base is None or not hasattr(head, "get_delta_weight"):
        return head.weight, getattr(head, "bias", None)
    weight = base.weight
    if not getattr(head, "disable_adapters", False) and not getattr(head, "merged", False):
        for name in getattr(head, "active_adapters", ()):
            if name in getattr(head, "lora_A", {}):
                weight = weight + head.get_delta_weight(name)
    return weight, getattr(base, "bias", None)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _last_hidden(output) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state


def all_finite(capture: ModelCapture) -> bool:
    """True if every captured tensor of ``capture`` is finite (used to check teacher outputs)."""
    tensors = [capture.final_hidden, *capture.hidden_states.values()]
    tensors += [t for qkv in capture.qkv.values() for t in qkv]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)
