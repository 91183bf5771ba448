"""Default: Fashion-MNIST, CIFAR-style ResNet-20 at w4a4 (first/last 8-bit).

Sized to finish in about 10 minutes on 2 CPU cores.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model = "cifar_resnet20"
  c.width = 0.5
  c.quant = "w4a4_fl8"
  c.num_epochs = 5.0
  c.batch_size = 128
  c.learning_rate = 0.1
  c.warmup_epochs = 0.3
  c.augment = False  # converges faster in a short budget (RESULTS.md)
  return c
