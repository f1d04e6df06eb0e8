"""Autograd functions and kernels behind the functionals."""
