"""A whole training step of a small transformer LM: torch's loss vs xloss's.

The model: token embedding, two pre-norm transformer layers (d = 256, 4 heads, causal),
a final LayerNorm and an untied output layer (V x d, no bias); a batch of 8 x 128 tokens,
10% of them padding (``ignore_index=-100``). One step is zero_grad, forward, loss,
backward and an AdamW step. The variants differ only in the loss:

- ``torch``: ``F.cross_entropy(head(h), y)`` (the N x V logits materialised),
- ``xloss cross_entropy``: ``xloss.cross_entropy(head(h), y)`` (the same logits, the fused
  kernel instead of torch's log_softmax + nll),
- ``xloss linear``: ``xloss.linear_cross_entropy(h, head.weight, y)`` (the model's head
  passed to the chunked loss; the logits never exist whole).

Peak extra memory is the RSS high-water mark of the timed steps over the RSS once the
model, the optimizer state and the batch exist.
"""

from __future__ import annotations

from xloss.bench.registry import Table, register

DIM, LAYERS, HEADS, BATCH, STEPS_PER_SAMPLE = 256, 2, 4, 8, 128


def _model_and_batch(case: dict):
    import torch
    from torch import nn

    torch.manual_seed(0)
    vocab = case["v"]
    layer = nn.TransformerEncoderLayer(
        DIM, HEADS, 4 * DIM, dropout=0.0, batch_first=True, norm_first=True
    )
    model = nn.ModuleDict(
        dict(
            embed=nn.Embedding(vocab, DIM),
            body=nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False),
            norm=nn.LayerNorm(DIM),
            head=nn.Linear(DIM, vocab, bias=False),
        )
    )
    tokens = torch.randint(0, vocab, (BATCH, STEPS_PER_SAMPLE + 1))
    inputs, target = tokens[:, :-1], tokens[:, 1:].clone()  # B x T
    target[:, -STEPS_PER_SAMPLE // 10 :] = -100  # padding at the end of every sample
    causal = nn.Transformer.generate_square_subsequent_mask(STEPS_PER_SAMPLE)
    return model, inputs, target.reshape(-1), causal


def _setup(loss_of_hidden):
    def setup(case: dict):
        return shared_steps(case, {"step": loss_of_hidden})["step"]

    return setup


def shared_steps(case: dict, losses: dict) -> dict:
    """One model, optimizer and batch, and a step function per entry of ``losses`` (name:
    loss of (hidden, head, target)) that trains that one model: steps of different
    losses alternated this way differ in the loss alone, not in where each model's
    tensors landed in memory."""
    import torch

    model, inputs, target, causal = _model_and_batch(case)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def make(loss_of_hidden):
        def step():
            optimizer.zero_grad(set_to_none=True)
            hidden = model["body"](model["embed"](inputs), mask=causal, is_causal=True)
            hidden = model["norm"](hidden).reshape(-1, DIM)  # N x d
            loss_of_hidden(hidden, model["head"], target).backward()
            optimizer.step()

        return step

    return {name: make(loss) for name, loss in losses.items()}


def _torch_loss(hidden, head, target):
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden), target)


def _xloss_cross_entropy(hidden, head, target):
    import xloss

    return xloss.cross_entropy(head(hidden), target)


def _xloss_linear(hidden, head, target):
    import xloss

    return xloss.linear_cross_entropy(hidden, head.weight, target)


register(
    Table(
        name="training_step",
        title=f"LM training step ({LAYERS} layers, d={DIM}, {BATCH}x{STEPS_PER_SAMPLE} tokens, "
        "AdamW; extra mem x N*V logits)",
        cases=[dict(v=v) for v in (256, 8192, 32000, 128256)],
        quick_cases=[dict(v=256), dict(v=8192)],
        variants={
            "torch": _setup(_torch_loss),
            "xloss cross_entropy": _setup(_xloss_cross_entropy),
            "xloss linear": _setup(_xloss_linear),
        },
        input_bytes=lambda case: 4 * BATCH * STEPS_PER_SAMPLE * case["v"],
        label=lambda case: f"V={case['v']}",
        bandwidth=False,
    )
)
