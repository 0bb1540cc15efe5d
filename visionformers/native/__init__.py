"""Optional CPU kernels, attached to models from outside: C sources (``csrc/``), compiled on first use and cached
per machine (``build``), exposed as torch ops (``ops``) and attached with one explicit call.

``vf.native.optimize(model)`` prepares a model for CPU inference (decoding, sampling, evaluation): it never
changes what a model computes beyond float rounding, and training code never calls it. Nothing in ``nn/``,
``vision/``, ``text/`` or ``diffusion/`` imports this package; without it the models run unchanged.
"""
from visionformers.native.ops import kernel_available
from visionformers.native.optimize import RowsLinear, kernels_pay, optimize

__all__ = ["optimize", "RowsLinear", "kernel_available", "kernels_pay"]
