"""ImageNet ResNet-50 v1.5, mirroring "Pareto-Optimal Quantized ResNet Is
Mostly 4-bit": bf16 compute, 250 epochs, SGD Nesterov 0.9, lr 0.1 x
batch/256, 5-epoch warmup, cosine decay, label smoothing 0.1, weight decay
1e-4 (kernels only). The quantization is chosen by the config string:

  --config=configs/imagenet_resnet50.py:bf16
  --config=configs/imagenet_resnet50.py:w8a8
  --config=configs/imagenet_resnet50.py:w4a4_fl8   (first/last at 8 bits)

Needs imagenet2012 prepared in TFDS format under `data_dir`.
"""

from configs import base

QUANTS = ("bf16", "w8a8", "w4a4_fl8")


def get_config(quant: str = "w4a4_fl8"):
  if quant not in QUANTS:
    raise ValueError(f"imagenet_resnet50 config argument {quant!r} is not "
                     f"allowed; allowed values: {', '.join(QUANTS)}")
  c = base.get_config()
  c.dataset = "imagenet2012"
  c.model = "resnet50"
  c.width = 1.0
  c.quant = quant
  c.dtype = "bfloat16"
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 250.0
  c.warmup_epochs = 5.0
  c.learning_rate = 0.1 * c.batch_size / 256
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 1e-4
  c.label_smoothing = 0.1
  c.log_every_steps = 100
  c.eval_every_steps = 1251 * 5
  c.checkpoint_every_steps = 1251
  c.keep_checkpoints = 3
  return c
