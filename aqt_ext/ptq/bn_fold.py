"""BatchNorm folding for the framework's ResNets (methods.md sec. 5, step 1).

Every conv of `aqt_ext.models` is a bias-free `QuantConv` followed by an
`nn.BatchNorm` in the same parent module, paired by name: ``conv_init`` /
``bn_init``, ``convK`` / ``bnK`` and ``proj_conv`` / ``proj_bn``. In eval
mode the BatchNorm computes, per output channel,

    y = (x - mean) * g + beta,    g = gamma / sqrt(var + eps).

Folding moves g into the conv kernel (``kernel[..., c] *= g[c]``) and turns
the BatchNorm into an identity plus a bias, so the module tree, the parameter
shapes and the model code stay unchanged: mean = 0, var = 1 - eps (so that
sqrt(var + eps) = 1), gamma = 1, beta = beta - mean * g. The folded model
computes the same function up to float rounding; only its kernels change, and
those are what post-training quantization then quantizes. The arithmetic is
float32 numpy (offline, nothing to compile).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

Tree = Mapping[str, Any]

# conv name pattern -> name of the BatchNorm that follows it in the same parent.
_BN_NAMES: tuple[tuple[str, str], ...] = (
    (r"^conv_(\w+)$", r"bn_\1"),     # conv_init -> bn_init
    (r"^conv(\d+)$", r"bn\1"),       # conv1 -> bn1
    (r"^(\w+)_conv$", r"\1_bn"),     # proj_conv -> proj_bn
)


def bn_name_for(conv_name: str) -> str | None:
  """Name of the BatchNorm paired with the conv named `conv_name`, if any."""
  for pattern, repl in _BN_NAMES:
    if re.match(pattern, conv_name):
      return re.sub(pattern, repl, conv_name)
  return None


def find_conv_bn_pairs(params: Tree, prefix: tuple[str, ...] = ()
                       ) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
  """(conv path, bn path) of every conv with a paired BatchNorm sibling.

  A conv is a module holding a ``kernel``; its BatchNorm must be a sibling
  (same parent) holding ``scale`` and ``bias``. Paths are tuples of module
  names, in the order the parameter tree lists them.
  """
  pairs = []
  for name, sub in params.items():
    if not isinstance(sub, Mapping):
      continue
    bn = bn_name_for(name)
    if "kernel" in sub and bn is not None and _is_bn(params.get(bn)):
      pairs.append((prefix + (name,), prefix + (bn,)))
    pairs.extend(find_conv_bn_pairs(sub, prefix + (name,)))
  return pairs


def _is_bn(sub: Any) -> bool:
  return isinstance(sub, Mapping) and "scale" in sub and "bias" in sub


def _get(tree: Tree, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  tree[path[-1]] = value


def _copy(tree: Tree) -> dict:
  """Copy of the nested dict structure (leaves shared)."""
  return {k: _copy(v) if isinstance(v, Mapping) else v
          for k, v in tree.items()}


def fold_batch_norm(variables: Tree, epsilon: float) -> dict:
  """Folds every paired BatchNorm into its conv; returns new variables.

  Args:
    variables: a model's ``params`` and ``batch_stats`` (other collections
      are copied unchanged).
    epsilon: the BatchNorms' epsilon (the model's ``bn_epsilon``).

  Returns:
    Variables of the same structure and shapes: folded kernels, identity
    BatchNorms carrying the folded bias.
  """
  if "batch_stats" not in variables:
    raise ValueError("fold_batch_norm needs the 'batch_stats' collection "
                     "(BatchNorm running mean and variance)")
  out = _copy(variables)
  params, stats = out["params"], out["batch_stats"]
  for conv, bn in find_conv_bn_pairs(variables["params"]):
    bn_params, bn_stats = _get(params, bn), _get(stats, bn)
    gamma = np.asarray(bn_params["scale"], np.float32)
    mean = np.asarray(bn_stats["mean"], np.float32)
    g = gamma / np.sqrt(np.asarray(bn_stats["var"], np.float32)
                        + np.float32(epsilon))
    kernel = np.asarray(_get(params, conv)["kernel"])
    _set(params, conv + ("kernel",), (kernel * g).astype(kernel.dtype))
    _set(params, bn, {"scale": np.ones_like(gamma),
                      "bias": np.asarray(bn_params["bias"], np.float32)
                              - mean * g})
    _set(stats, bn, {"mean": np.zeros_like(mean),
                     "var": np.full_like(mean, 1.0 - epsilon)})
  return out
