"""PWLQ breakpoint grid search over (0, m) vs stopped at m/2 (issue 14).

  .venv/bin/python experiments/method_checks/pwlq_search_range.py

Gaussian kernels, per output channel: 3x3x1x64 (9 weights per channel) at
3 and 4 bits for two seeds, and 3x3x16x64 (144 per channel) at 4 bits.
Prints the MSE ratio (full range / stopped at m/2) and how many channels
chose p > m/2.
"""
import sys

import numpy as np

sys.path.insert(0, "tests")
from test_ptq_methods import _normal  # noqa: E402

from aqt_ext.ptq import pwlq  # noqa: E402


def mse(w, p, bits):
  return float(np.mean((w - np.asarray(pwlq.pwlq_fake_quant(w, p, bits))) ** 2))


for shape, seeds, bit_list in (((3, 3, 1, 64), (11, 12), (3, 4)),
                               ((3, 3, 16, 64), (3,), (4,))):
  for seed in seeds:
    w = _normal(shape, seed=seed)
    m = np.abs(w).max(axis=(0, 1, 2))
    for bits in bit_list:
      p = np.asarray(pwlq.breakpoint_grid(w, bits))
      half = np.asarray(pwlq.breakpoint_grid(w, bits, max_ratio=0.5))
      print(f"shape {shape} seed {seed} bits {bits}: MSE ratio "
            f"{mse(w, p, bits) / mse(w, half, bits):.3f}, channels with "
            f"p > m/2: {(p > m / 2).sum()}/{len(m)}")
