"""xloss.integrations.transformers on tiny random models built from configs (no download).

Every test compares the patched model with an unpatched copy of the same weights, or
with a torch reference computed from the unpatched model's own logits.
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from xloss.integrations import transformers as xloss_hf  # noqa: E402

V = 97  # an odd vocabulary


def tiny(family: str, vocab: int = V, hidden: int = 16):
    """A tiny fp32 causal LM with random weights, no dropout."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    if family == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=2,
                                         n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
        assert model.lm_head.weight is model.transformer.wte.weight  # tied
    elif family == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0)
        config._attn_implementation = "eager"
        model = transformers.Gemma2ForCausalLM(config)
    else:
        raise ValueError(family)
    with torch.no_grad():  # some families start with zero biases or tiny weights
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.float().train()


def batch(seed=1, shape=(3, 11), vocab=V):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    labels[-1, 7:] = -100  # padding
    return ids, labels


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same(got, want, tol=1e-5):
    got_out, got_grads = got
    want_loss, want_grads = want
    torch.testing.assert_close(got_out.loss, want_loss, rtol=tol, atol=tol)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


FAMILIES = ["llama", "qwen2", "gpt2", "gemma2"]


@pytest.mark.parametrize("normalizer", [None, 13])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_every_gradient_equal_the_models_own(family, normalizer):
    model = tiny(family)
    patched = xloss_hf.apply(copy.deepcopy(model))
    ids, labels = batch()
    extra = {} if normalizer is None else dict(num_items_in_batch=torch.tensor(normalizer))
    want_out, want_grads = loss_and_grads(model, input_ids=ids, labels=labels, **extra)
    got = loss_and_grads(patched, input_ids=ids, labels=labels, **extra)
    assert got[0].logits is None  # training: no logits
    assert_same(got, (want_out.loss, want_grads))


def reference_loss(model, ids, labels, *, label_smoothing, z_loss):
    """torch's cross-entropy (with smoothing) plus z * mean(lse^2) on the model's logits."""
    logits = model(input_ids=ids).logits  # softcapped by the model itself (Gemma 2)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    rows, target = logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1)
    loss = F.cross_entropy(rows, target, label_smoothing=label_smoothing)
    kept = target != -100
    return loss + z_loss * torch.logsumexp(rows[kept], -1).square().mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_label_smoothing_and_z_loss_against_a_torch_reference(family):
    model = tiny(family)
    settings = dict(label_smoothing=0.1, z_loss=1e-3)
    patched = xloss_hf.apply(copy.deepcopy(model), **settings)
    ids, labels = batch()
    model.zero_grad()
    want_loss = reference_loss(model, ids, labels, **settings)
    want_loss.backward()
    want_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert_same(loss_and_grads(patched, input_ids=ids, labels=labels), (want_loss, want_grads))


def test_shift_labels_are_used_as_given():
    model = tiny("llama")
    patched = xloss_hf.apply(copy.deepcopy(model))
    ids, labels = batch()
    shift = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(5))
    shift[1, 3:] = -100
    want = loss_and_grads(model, input_ids=ids, labels=labels, shift_labels=shift)
    got = loss_and_grads(patched, input_ids=ids, labels=labels, shift_labels=shift)
    assert_same(got, (want[0].loss, want[1]))
    # shift_labels alone (no labels) also takes the loss path
    got_alone = patched(input_ids=ids, shift_labels=shift)
    torch.testing.assert_close(got_alone.loss, want[0].loss, rtol=1e-5, atol=1e-5)


def test_without_labels_and_in_eval_mode_the_model_is_unchanged():
    model = tiny("gemma2")
    patched = xloss_hf.apply(copy.deepcopy(model))
    ids, labels = batch()
    torch.testing.assert_close(patched(input_ids=ids).logits, model(input_ids=ids).logits)
    for keep in (1, 3):  # generation's logits_to_keep
        got = patched(input_ids=ids, logits_to_keep=keep).logits
        assert got.shape == (3, keep, V)
        torch.testing.assert_close(got, model(input_ids=ids, logits_to_keep=keep).logits)
    patched.eval(), model.eval()
    got, want = patched(input_ids=ids, labels=labels), model(input_ids=ids, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)  # eval: logits kept for metrics
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)


def test_return_dict_false_gives_transformers_tuple():
    model = tiny("qwen2")
    patched = xloss_hf.apply(copy.deepcopy(model))
    ids, labels = batch()
    got = patched(ids, None, None, None, None, labels, return_dict=False)  # labels positional
    want = model(input_ids=ids, labels=labels)
    assert isinstance(got, tuple)
    torch.testing.assert_close(got[0], want.loss, rtol=1e-5, atol=1e-5)


def test_revert_restores_the_models_forward():
    model = tiny("llama")
    ids, labels = batch()
    want = model(input_ids=ids, labels=labels)
    xloss_hf.apply(model, label_smoothing=0.2)
    assert model(input_ids=ids, labels=labels).logits is None
    xloss_hf.apply(model)  # again: new settings, still one patch
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, want.loss)
    xloss_hf.revert(model)
    assert "forward" not in model.__dict__
    again = model(input_ids=ids, labels=labels)
    assert torch.equal(again.loss, want.loss) and again.logits is not None
    with pytest.raises(ValueError, match="not patched by xloss"):
        xloss_hf.revert(model)


def test_peft_lora_on_the_output_layer():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["q_proj", "lm_head"])  # fmt: skip
    model = peft.get_peft_model(tiny("llama"), config)
    patched = copy.deepcopy(model)
    xloss_hf.apply(patched)
    ids, labels = batch()
    want = loss_and_grads(model, input_ids=ids, labels=labels)
    got = loss_and_grads(patched, input_ids=ids, labels=labels)
    assert any("lm_head.lora_B" in name for name in got[1])
    assert_same(got, (want[0].loss, want[1]))
    with model.disable_adapter(), patched.disable_adapter():  # adapters off: base weight
        torch.testing.assert_close(patched(input_ids=ids, labels=labels).loss,
                                   model(input_ids=ids, labels=labels).loss)  # fmt: skip
    xloss_hf.revert(patched)


def test_peft_lora_dropout_on_the_output_layer_is_refused():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["lm_head"])
    model = xloss_hf.apply(peft.get_peft_model(tiny("llama"), config))
    ids, labels = batch()
    with pytest.raises(ValueError, match="lora_dropout=0.1"):
        model(input_ids=ids, labels=labels)


def test_errors():
    with pytest.raises(TypeError, match="must be a transformers causal LM"):
        xloss_hf.apply(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="`label_smoothing` must lie in"):
        xloss_hf.apply(tiny("llama"), label_smoothing=2.0)
    with pytest.raises(TypeError, match="`chunk_size` must be a positive int"):
        xloss_hf.apply(tiny("llama"), chunk_size=1.5)
    model = xloss_hf.apply(tiny("llama"))
    ids, labels = batch()
    with pytest.raises(ValueError, match="logits_to_keep must keep every position"):
        model(input_ids=ids, labels=labels, logits_to_keep=1)
    model.get_output_embeddings = lambda: torch.nn.Identity()
    with pytest.raises(RuntimeError, match="never called its output layer"):
        model(input_ids=ids, labels=labels)

    class Custom(torch.nn.Linear):
        def forward(self, hidden):
            return super().forward(hidden) * 2

    model = xloss_hf.apply(tiny("llama"))
    model.lm_head = Custom(16, V, bias=False)
    with pytest.raises(TypeError, match="must be an nn.Linear or a PEFT LoRA"):
        model(input_ids=ids, labels=labels)


class RescaledLlama(transformers.LlamaForCausalLM):
    """A model that changes its logits after the output layer, unknown to xloss."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        output = super().forward(input_ids, labels=labels, **kwargs)
        output.logits = output.logits * 2.0
        return output


def test_a_change_to_the_logits_after_the_output_layer_is_refused():
    model = RescaledLlama(tiny("llama").config)
    ids, labels = batch()
    xloss_hf.apply(model)
    with pytest.raises(RuntimeError, match="changes its logits after the output layer"):
        model(input_ids=ids, labels=labels)


def train(model, steps=3, accumulation=2, tmp_path=None):
    """Trainer, 3 optimizer steps of 2 accumulated micro-batches; the logged losses."""
    rows = []
    for i in range(steps * accumulation * 2):
        ids, labels = batch(seed=100 + i, shape=(1, 9))
        labels[0, : i % 5] = -100  # a different token count per row
        rows.append(dict(input_ids=ids[0], labels=labels[0]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
        gradient_accumulation_steps=accumulation, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, lr_scheduler_type="constant",
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_with_gradient_accumulation(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    calls = []
    fused = xloss_hf.linear_cross_entropy

    def counting(*args, **kwargs):
        calls.append(kwargs.get("normalizer"))
        return fused(*args, **kwargs)

    monkeypatch.setattr(xloss_hf, "linear_cross_entropy", counting)
    model = tiny("llama")
    patched = xloss_hf.apply(copy.deepcopy(model))
    want = train(model, tmp_path=tmp_path / "plain")
    got = train(patched, tmp_path=tmp_path / "xloss")
    assert len(want) == len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert len(calls) == 6 and all(count is not None for count in calls)  # num_items_in_batch
    for (name, p), q in zip(model.named_parameters(), patched.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def _peak_kib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _rss_kib() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1))


def peak_extra_memory(model, ids, labels) -> int:
    """Peak resident memory of one training step above the memory before it (KiB)."""
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=labels).loss.backward()  # warm-up: gradients allocated
    before = _rss_kib()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak (VmHWM) to the current resident size
    model(input_ids=ids, labels=labels).loss.backward()
    return _peak_kib() - before


@pytest.mark.skipif(
    not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc"
)
def test_training_step_peak_memory_is_lower_at_32k_vocabulary():
    model = tiny("llama", vocab=32000, hidden=64)
    patched = xloss_hf.apply(copy.deepcopy(model))
    ids, labels = batch(shape=(4, 256), vocab=32000)
    logits_kib = ids.numel() * 32000 * 4 // 1024
    plain = peak_extra_memory(model, ids, labels)
    fused = peak_extra_memory(patched, ids, labels)
    assert plain > 2 * logits_kib  # the logits, their log-softmax and gradient
    assert fused < plain / 2, (fused, plain)
