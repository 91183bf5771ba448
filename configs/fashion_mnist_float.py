"""Fashion-MNIST, full-width CIFAR-style ResNet-20, float, longer budget.

15 epochs (7,035 steps of 128) with crop+flip augmentation: about 80 minutes
on 2 CPU cores (experiments/RESULTS.md). Its checkpoint is the starting
point of configs/fashion_mnist_w4a4.py.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model = "cifar_resnet20"
  c.width = 1.0
  c.quant = "float"
  c.num_epochs = 15.0
  c.warmup_epochs = 1.0
  c.learning_rate = 0.1
  c.batch_size = 128
  c.label_smoothing = 0.0
  c.augment = True
  c.checkpoint_every_steps = 1000
  return c
