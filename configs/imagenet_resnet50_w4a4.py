"""ImageNet ResNet-50 v1.5 at w4a4_fl8 (see imagenet_resnet50.py)."""

from configs import imagenet_resnet50


def get_config():
  return imagenet_resnet50.get_config("w4a4_fl8")
