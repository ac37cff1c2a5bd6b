"""Scratch: decode attention split counts at batch 1-4 (bench.attention_kernel's sweep, other shapes)."""
import sys

from pdserve.bench import attention_kernel as ak

ak.SPLITS_SWEEP_SHAPES = [(1, 1024), (1, 4096), (2, 1024), (4, 1024)]
ak.SPLITS_SWEEP_COUNTS = [2, 4, 8, 12, 16, 24, 32, 44, 66, 132]
sys.argv = [sys.argv[0], "--splits-sweep", "--kv-cache-dtypes", "auto"]
ak.main()
