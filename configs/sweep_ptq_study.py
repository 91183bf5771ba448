"""PTQ study on three float checkpoints (experiments/ptq_study/, issue 14).

CIFAR-style ResNet-8 (width 0.5) on Fashion-MNIST: three float models
(seeds 0, 1, 2: the seed changes the initialisation and the data order; 3
epochs of all 60,000 training images, SGD+Nesterov lr 0.1, no augmentation),
each quantized after training by every PTQ method of the sweep driver (rtn,
rtn_full, pwlq, pwlq_bc, rex, rex_sparse, aquant, at their
`aqt_ext.ptq.pipeline.ptq_defaults`) at W8A8, W4A8, W4A4 and W2A4, every
layer at those bits (first and last too, as experiments/ptq_fashion_mnist).
No PTQ setting is chosen here, so every point reads the test set once.
3 + 3 x 4 x 7 = 87 points:

  python -m aqt_ext.sweep --config=configs/sweep_ptq_study.py --workdir=DIR
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = base.get_config()
  b = c.base
  b.dataset = "fashion_mnist"
  b.model = "cifar_resnet8"
  b.width = 0.5
  b.augment = False
  b.num_epochs = 3.0
  b.batch_size = 128
  b.learning_rate = 0.1
  b.warmup_epochs = 0.2
  b.eval_batch_size = 1000
  b.log_every_steps = 200
  b.checkpoint_every_steps = 500
  c.models = (("cifar_resnet8", 0.5),)
  c.quants = ("float", "w8a8", "w4a8", "w4a4", "w2a4")
  c.first_last = (None,)
  c.methods = ("rtn", "rtn_full", "pwlq", "pwlq_bc", "rex", "rex_sparse",
               "aquant")
  c.seeds = (0, 1, 2)
  return c
