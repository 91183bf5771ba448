"""CIFAR-10, CIFAR-style ResNet-20 at w4a4 (first/last 8-bit).

Needs CIFAR-10 prepared in TFDS format under `data_dir`
(`tfds build cifar10 --data_dir=...` on a machine with network access).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.dataset = "cifar10"
  c.model = "cifar_resnet20"
  c.quant = "w4a4_fl8"
  c.num_epochs = 160.0
  c.warmup_epochs = 2.0
  c.learning_rate = 0.1
  c.batch_size = 128
  c.weight_decay = 1e-4
  c.checkpoint_every_steps = 2000
  c.eval_every_steps = 3910
  return c
