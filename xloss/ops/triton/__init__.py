"""Triton kernels (GPU tensors; CPU tensors under ``TRITON_INTERPRET=1``), one file per
kernel family. Imported on first use only: ``import xloss`` never imports triton."""
