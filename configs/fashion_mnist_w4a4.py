"""Fashion-MNIST, full-width CIFAR-style ResNet-20 at w4a4 (first/last at 8
bits), the same longer budget as fashion_mnist_float.py."""

from configs import fashion_mnist_float


def get_config():
  c = fashion_mnist_float.get_config()
  c.quant = "w4a4_fl8"
  return c
