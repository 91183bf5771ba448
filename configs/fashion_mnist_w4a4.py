"""Fashion-MNIST, full-width CIFAR-style ResNet-20 at w4a4 (first/last at 8
bits): QAT fine-tuning of the float model of fashion_mnist_float.py.

The float run comes first; its --workdir is `init_from` (default
`workdirs/fm_float`, the README's command):

  bash scripts/run.sh --config=configs/fashion_mnist_float.py --workdir=workdirs/fm_float
  bash scripts/run.sh --config=configs/fashion_mnist_w4a4.py --workdir=workdirs/fm_w4a4

Fine-tuning a trained float model is the LSQ / Direct Quantization papers'
protocol; on 2 CPU cores it also costs a fifth of training w4a4 from scratch
for the float model's 15 epochs. The run loads the float params and
BatchNorm statistics; uniform w4a4 takes its ranges from each tensor, so it
has no quantizer state to create (with e.g. --config.quant=lsq:w4a4_fl8 the
LSQ steps are created from the loaded weights and the first batch).
"""

from configs import fashion_mnist_float


def get_config():
  c = fashion_mnist_float.get_config()
  c.quant = "w4a4_fl8"
  c.init_from = "workdirs/fm_float"
  c.num_epochs = 3.0
  c.warmup_epochs = 0.1
  c.learning_rate = 0.02
  return c
