"""Low-precision training (issue 16): Fashion-MNIST, full-width CIFAR-style
ResNet-20, float vs AQT int8 forward + int8 backward (every layer, both
gradient contractions, per channel; AQT's fully quantized training with a
fake-quant forward) vs fp8 e4m3 forward + e5m2 backward, 3 seeds.

The long config's setup (configs/fashion_mnist_float.py: crop+flip, SGD
Nesterov, lr 0.1, batch 128, weight decay 5e-4) on a 2-epoch budget
(936 steps), since 15 epochs of three variants do not fit a session on 2
CPU cores; warmup shortened to 0.2 epochs to match. No hyperparameter is
chosen here: every variant uses float's.

  python -m aqt_ext.sweep --config=configs/sweep_low_precision.py \\
      --workdir=workdirs/sweep_low_precision --parallel=2
"""

import ml_collections

from configs import fashion_mnist_float


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = fashion_mnist_float.get_config()
  c.base.num_epochs = 2.0
  c.base.warmup_epochs = 0.2
  c.base.checkpoint_every_steps = 200
  c.base.eval_batch_size = 1000
  c.models = (("cifar_resnet20", 1.0),)
  c.quants = ("float", "w8a8_g8", "fp8_ge5m2")
  c.first_last = (None,)
  c.methods = ("aqt",)
  c.seeds = (0, 1, 2)
  return c
