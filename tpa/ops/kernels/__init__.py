"""The Triton kernels, defined with ``triton.jit``. Importing this package imports Triton: the host
modules (:mod:`tpa.ops.decode_launch`, :mod:`tpa.ops.fused_materialize`) import it only where
Triton is installed, on the first call of a Triton path."""
