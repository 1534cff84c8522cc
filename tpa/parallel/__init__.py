"""Parallelism beyond data parallel: tensor parallelism (:mod:`tpa.parallel.tensor_parallel`), its fused
projections held shard by shard (:mod:`tpa.parallel.fused`) and their single-process checkpoint layout
(:mod:`tpa.parallel.state_dict`)."""

from tpa.parallel.state_dict import from_plain, to_plain
from tpa.parallel.tensor_parallel import apply_tensor_parallel, make_mesh, setup_tensor_parallel, sum_gradients

__all__ = ["apply_tensor_parallel", "from_plain", "make_mesh", "setup_tensor_parallel", "sum_gradients", "to_plain"]
