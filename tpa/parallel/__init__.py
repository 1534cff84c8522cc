"""Parallelism beyond data parallel: tensor parallelism (:mod:`tpa.parallel.tensor_parallel`)."""

from tpa.parallel.tensor_parallel import apply_tensor_parallel, make_mesh, setup_tensor_parallel, sum_gradients

__all__ = ["apply_tensor_parallel", "make_mesh", "setup_tensor_parallel", "sum_gradients"]
