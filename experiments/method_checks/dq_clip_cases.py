"""DQ input clip on the two cases of methods.md sec. 4 (issue 14).

  .venv/bin/python experiments/method_checks/dq_clip_cases.py

Relu'd Gaussian activations, 2048 rows x 64 channels, 4 bits, unsigned grid:
(i) 60 channels of std 1 + 4 of std 20, (ii) 40 of std 1 + 24 of std 0.05.
For the clip of the current objective (energy floored at the median
channel's), the pooled MSE, and the unfloored normalised mean (the first
design), prints alpha and the median / mean per-channel normalised error.
"""
import sys; sys.path.insert(0, "tests")
import jax, jax.numpy as jnp, numpy as np
from test_dq import _per_channel_error, _normalised_mean_clip
from aqt_ext.core import clip_search as cs
for name, std, key in (("60x1 + 4x20", jnp.concatenate([jnp.ones(60), jnp.full(4, 20.0)]), 5),
                       ("40x1 + 24x0.05", jnp.concatenate([jnp.ones(40), jnp.full(24, 0.05)]), 6)):
  x = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(key), (2048, 64)) * std)
  for label, a in (("floored (new)", cs.fit_clip(x, 4, "unsigned")), ("pooled MSE", cs.pooled_mse_clip(x, 4, "unsigned")), ("normalised mean (old)", _normalised_mean_clip(x, 4, "unsigned"))):
    e = _per_channel_error(x, a, 4, "unsigned")
    print(f"{name:16s} {label:22s} alpha {float(a):7.3f}  median channel err {np.median(e):.5f}  mean {np.mean(e):.5f}")
