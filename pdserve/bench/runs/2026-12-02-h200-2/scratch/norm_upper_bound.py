"""Scratch (next GPU session): the most folding RMSNorm into its neighbours could buy. Every RMSNorm
(and its fused residual add) is patched out of the model, then bench.profile_decode runs as usual:
the replay time is a lower bound for a step whose norms live inside the GEMV/attention/SiLU kernels
and whose residual adds ride cuBLAS's epilogue (addmm, beta=1). Random weights: values may overflow;
timing does not depend on them. Run: python3 exp/norm_upper_bound.py --batch-size 1 64"""
import sys

from pdserve.bench import profile_decode
from pdserve.engine import layers


def _no_norm(self, x, residual=None):  # noqa: ANN001, ANN202 - scratch
    return x if residual is None else (x, residual)


layers.RMSNorm.forward = _no_norm
sys.argv = [sys.argv[0], *sys.argv[1:]]
profile_decode.main()
