"""Patches that put xloss into other frameworks' models, one submodule per framework.

Each submodule imports its framework lazily (only when the submodule itself is imported),
so ``import xloss`` never imports it::

    from xloss.integrations import transformers as xloss_hf
    xloss_hf.apply(model, label_smoothing=0.1)
"""
