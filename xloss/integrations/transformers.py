"""Hugging Face ``transformers`` causal LMs with the loss from :func:`xloss.linear_cross_entropy`.

``apply(model)`` patches one model instance: a forward with ``labels`` computes the loss
from the final hidden states and the output layer's weight (and bias) in row chunks, so
the (B, T, V) logits are never built; without ``labels`` the model behaves as before.
``revert(model)`` undoes it. Nothing is specific to a model family: the output layer is
``model.get_output_embeddings()``, wherever the model keeps it.

How a patched forward with ``labels`` runs:

1. the model's own forward runs with ``labels=None`` while the output layer's
   ``forward`` is swapped for a probe that records the hidden states it receives (after
   the model's own ``logits_to_keep`` slicing) and returns an empty (..., 0) tensor, so
   whatever the model does to its logits afterwards (Gemma 2's soft-capping) costs
   nothing; in eval mode (``model.training`` False) the real logits are computed too;
2. the labels are shifted as transformers' ``ForCausalLMLoss`` does (``labels[..., 1:]``
   padded with -100 at the end), or ``shift_labels`` is used as given;
3. ``xloss.linear_cross_entropy(hidden, weight, shifted, bias, ignore_index=-100,
   softcap=config.final_logit_softcapping, normalizer=num_items_in_batch, ...)``.

The output is the model's own output class with ``loss`` set and ``logits=None`` in
training mode (``return_dict=False`` gives the tuple transformers builds from it).
"""

from __future__ import annotations

import functools
import inspect
import numbers

from torch import Tensor, nn

from xloss._core.validation import check_non_negative, check_unit_interval
from xloss.functional.linear_cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100  # transformers' label padding value
_STATE = "_xloss_transformers"  # the attribute holding a patched model's state


def _causal_lm(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` inside ``model`` (PEFT wrappers unwrapped), or a clear error."""
    inner = model
    while hasattr(inner, "get_base_model") and inner.get_base_model() is not inner:
        inner = inner.get_base_model()  # peft.PeftModel -> the transformers model
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or "labels" not in inspect.signature(inner.forward).parameters:
        raise TypeError(
            "`model` must be a transformers causal LM (a *ForCausalLM with labels= in its "
            "forward and an output layer from get_output_embeddings()), got "
            f"{type(model).__name__}"
        )
    return inner


def apply(
    model: nn.Module,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> nn.Module:
    r"""Compute the loss of ``model`` (a transformers causal LM) with xloss, in place.

    After the call, ``model(input_ids, labels=labels)`` returns the loss

    .. math::
        \ell = (1-\epsilon)(\mathrm{lse} - x_y) + \frac{\epsilon}{V} \sum_c (\mathrm{lse}
        - x_c) + z\, \mathrm{lse}^2

    per predicted token (x the logits ``hidden @ W.T + b`` after the model's
    ``final_logit_softcapping``, y the next token), averaged over the tokens whose label
    is not -100, or summed and divided by ``num_items_in_batch`` when the caller passes
    it (as ``transformers.Trainer`` does for gradient accumulation). With
    ``label_smoothing=0`` and ``z_loss=0`` this is the model's own loss, computed
    without the (B, T, V) logits. In training mode the output's ``logits`` is None; in
    eval mode it holds the model's logits as before. Without ``labels`` nothing changes.

    Supported: any model whose forward takes ``labels`` and whose
    ``get_output_embeddings()`` is an ``nn.Linear`` (tied embeddings included) or a PEFT
    LoRA layer over one (its active adapters folded into the weight; LoRA dropout must be
    0 in training). The only change a model may make to its logits after the output
    layer is the soft-capping named by ``config.final_logit_softcapping`` (Gemma 2) or a
    dtype cast; anything else raises ``RuntimeError`` at the first forward with labels.

    Args:
        model: a transformers ``*ForCausalLM`` instance, or a PEFT model around one.
        label_smoothing: eps in [0, 1].
        z_loss: coefficient of lse^2, >= 0.
        chunk_size: rows per chunk of :func:`xloss.linear_cross_entropy`; None picks one.

    Returns:
        ``model`` itself (patched). Applying again replaces the settings.

    Example:
        >>> import torch, transformers
        >>> from xloss.integrations import transformers as xloss_hf
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...     num_key_value_heads=2)
        >>> model = transformers.LlamaForCausalLM(config)
        >>> ids = torch.randint(0, 64, (2, 7))
        >>> before = model(ids, labels=ids).loss
        >>> model = xloss_hf.apply(model)
        >>> out = model(ids, labels=ids)
        >>> torch.allclose(out.loss, before, atol=1e-6), out.logits is None
        (True, True)
        >>> model = xloss_hf.revert(model)
    """
    settings = dict(
        label_smoothing=check_unit_interval("label_smoothing", label_smoothing),
        z_loss=check_non_negative("z_loss", z_loss),
        chunk_size=chunk_size,
    )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
    ):
        raise TypeError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}")
    causal_lm = _causal_lm(model)
    state = getattr(causal_lm, _STATE, None)
    if state is not None:
        state["settings"] = settings
        return model
    had_instance_forward = "forward" in causal_lm.__dict__
    original = causal_lm.forward  # bound; an instance attribute when someone patched before
    state = dict(settings=settings, original=original, had_instance_forward=had_instance_forward)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return _forward(causal_lm, state, args, kwargs)

    object.__setattr__(causal_lm, _STATE, state)
    causal_lm.forward = forward
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model's forward is its own again. Returns ``model``."""
    causal_lm = _causal_lm(model)
    state = causal_lm.__dict__.pop(_STATE, None)
    if state is None:
        raise ValueError(
            f"`model` ({type(model).__name__}) is not patched by xloss; nothing to revert"
        )
    if state["had_instance_forward"]:
        causal_lm.forward = state["original"]
    else:
        del causal_lm.forward
    return model


def _forward(causal_lm: nn.Module, state: dict, args: tuple, kwargs: dict):
    original = state["original"]
    args, kwargs = list(args), dict(kwargs)
    labels = kwargs.pop("labels", None)
    position = list(inspect.signature(original).parameters).index("labels")
    if position < len(args):
        labels, args[position] = args[position], None
    shift_labels = kwargs.pop("shift_labels", None)
    if labels is None and shift_labels is None:
        return original(*args, **kwargs)  # no labels: the model as it was
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    return_dict = kwargs.pop("return_dict", None)
    head = causal_lm.get_output_embeddings()
    want_logits = not causal_lm.training
    # 1. the model's own forward, with a probe in place of the output layer
    with _HeadProbe(head, want_logits) as probe:
        output = original(*args, **kwargs, return_dict=True)
    if probe.hidden is None:
        raise RuntimeError(
            f"{type(causal_lm).__name__}'s forward never called its output layer "
            f"({type(head).__name__}); xloss cannot compute its loss from hidden states"
        )
    softcap = _softcap(causal_lm)
    if not want_logits:
        logits = output.logits
        changed = logits is not probe.placeholder and logits.dtype == probe.placeholder.dtype
        if changed and softcap is None:
            raise RuntimeError(
                f"{type(causal_lm).__name__} changes its logits after the output layer, and "
                "not by config.final_logit_softcapping; xloss.integrations.transformers "
                "cannot reproduce that from the hidden states"
            )
    # 2. the labels shifted as transformers' ForCausalLMLoss does
    hidden = probe.hidden  # (..., T, H), after the model's logits_to_keep slicing
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"the labels (shifted) have shape {tuple(shift_labels.shape)} but the output "
            f"layer saw hidden states of shape {tuple(hidden.shape)}; with labels, "
            "logits_to_keep must keep every position (the default 0)"
        )
    # 3. the loss from the hidden states and the output layer's weight
    weight, bias = _linear_parameters(head)
    loss = linear_cross_entropy(
        hidden.to(weight.dtype),
        weight,
        shift_labels,
        bias,
        ignore_index=IGNORE_INDEX,
        reduction="mean" if num_items_in_batch is None else "sum",
        normalizer=num_items_in_batch,
        softcap=softcap,
        **state["settings"],
    )
    # A new output object: ModelOutput keeps None fields out of its dict and tuple.
    fields = {key: value for key, value in output.items() if key not in ("loss", "logits")}
    if want_logits:
        fields["logits"] = output.logits
    output = type(output)(loss=loss, **fields)
    return output.to_tuple() if return_dict is False else output


def _softcap(causal_lm: nn.Module) -> float | None:
    config = causal_lm.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    return None if softcap is None or softcap <= 0 else float(softcap)


class _HeadProbe:
    """Swaps the output layer's forward for one that records its input (a context)."""

    def __init__(self, head: nn.Module, want_logits: bool):
        self.head = head
        self.want_logits = want_logits
        self.hidden = None
        self.placeholder = None

    def __enter__(self):
        self.had_instance_forward = "forward" in self.head.__dict__
        self.forward = self.head.forward

        def probe(hidden, *args, **kwargs):
            self.hidden = hidden
            if self.want_logits:
                return self.forward(hidden, *args, **kwargs)
            self.placeholder = hidden.new_empty(hidden.shape[:-1] + (0,))  # (..., 0)
            return self.placeholder

        self.head.forward = probe
        return self

    def __exit__(self, *exc_info):
        if self.had_instance_forward:
            self.head.forward = self.forward
        else:
            del self.head.forward
        return False


def _linear_parameters(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight (V, H), bias (V) or None) that give the output layer's logits."""
    if type(head).forward is nn.Linear.forward:
        return head.weight, head.bias
    if hasattr(head, "base_layer") and hasattr(head, "lora_A"):
        return _lora_parameters(head)
    raise TypeError(
        "the output layer (get_output_embeddings()) must be an nn.Linear or a PEFT LoRA "
        f"layer over one, got {type(head).__name__}"
    )


def _lora_parameters(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """A PEFT LoRA layer as one linear map: W + sum_a s_a B_a A_a (and s_a b_a for B's bias).

    Differentiable, so the adapters get their gradients through the folded weight.
    """
    weight, bias = _linear_parameters(head.base_layer)
    if head.disable_adapters or head.merged:
        return weight, bias
    for name in head.active_adapters:
        if name not in head.lora_A.keys():
            continue
        if name in getattr(head, "lora_variant", {}):
            raise TypeError(
                f"LoRA adapter {name!r} on the output layer is a variant (e.g. DoRA) that "
                "xloss cannot fold into one weight; merge it or leave the output layer out"
            )
        dropout = head.lora_dropout[name]
        if head.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise ValueError(
                f"LoRA adapter {name!r} on the output layer has lora_dropout={dropout.p}; "
                "its dropout acts on the hidden states and cannot be folded into one weight "
                "(use lora_dropout=0 for the output layer)"
            )
        lora_a, lora_b = head.lora_A[name], head.lora_B[name]
        scaling = head.scaling[name]
        delta = (lora_b.weight @ lora_a.weight) * scaling  # V x H
        weight = weight + delta.to(weight.dtype)
        if getattr(lora_b, "bias", None) is not None:
            lora_bias = (lora_b.bias * scaling).to(weight.dtype)
            bias = lora_bias if bias is None else bias + lora_bias
    return weight, bias
