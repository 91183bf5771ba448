"""Fashion-MNIST, full-width CIFAR-style ResNet-20, float, longer budget.

15 epochs (7,020 steps of 128) with crop+flip augmentation: 93.73% test
accuracy in 86 minutes on 2 CPU cores, part of it shared (RESULTS.md). Its
checkpoint is the starting point of configs/fashion_mnist_w4a4.py.
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
