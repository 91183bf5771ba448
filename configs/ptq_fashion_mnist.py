"""PTQ of the float Fashion-MNIST ResNet-20 of fashion_mnist_float.py.

  --config=configs/ptq_fashion_mnist.py:METHOD   (rtn, pwlq, rex, aquant)

Bits: --config.quant=wWaA[_flB] (default w4a8). Method options:
--config.ptq.<field> (aqt_ext.ptq.pipeline.ptq_defaults). The model fields
(model, width) must match the float checkpoint: pass the same overrides as
its training run, e.g. --config.width=0.5.
"""

from aqt_ext.ptq import pipeline
from configs import fashion_mnist_float


def get_config(method: str = "rtn"):
  c = pipeline.with_ptq_defaults(fashion_mnist_float.get_config())
  c.ptq.method = method
  c.quant = "w4a8"
  return c
