"""Mixed precision vs uniform at equal BOPs (issue 17's study).

Fashion-MNIST, CIFAR-style ResNet-20 and ResNet-8 at width 0.5: a float
model per size and seed (2 epochs, the long config's recipe), then from it,
at the BOPs of uniform w3a3 / w4a4 / w6a6 (first/last at 8 bits), uniform
QAT and mixed precision (`mp`: loss-delta sensitivities on 4 training
batches, widths in {2,3,4,8}, first/last at 8), each fine-tuned for the same
0.5 epoch. 5,000 training images are held out as the validation split, on
which the points are evaluated (the fine-tuning learning rate is chosen
there); 3 seeds. `mp_min3` is the same without 2-bit candidates.

  python -m aqt_ext.sweep --config=configs/sweep_mixed_precision.py \\
      --workdir=workdirs/sweep_mixed_precision --parallel=2
"""

import ml_collections

from configs import fashion_mnist_float


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = fashion_mnist_float.get_config()
  c.base.num_epochs = 2.0
  c.base.warmup_epochs = 0.2
  c.base.validation_examples = 5000
  c.base.eval_split = "validation"
  c.base.checkpoint_every_steps = 200
  c.base.eval_batch_size = 1000
  c.models = (("cifar_resnet20", 0.5), ("cifar_resnet8", 0.5))
  c.quants = ("float", "w3a3", "w4a4", "w6a6")
  c.first_last = (8,)
  # mp_min3: mp without 2-bit candidates (an ablation added after the
  # first results: the allocations' 2-bit layers recovered badly).
  c.methods = ("uniform", "mp", "mp_min3")
  c.seeds = (0, 1, 2)
  c.finetune = dict(num_epochs=0.5, learning_rate=0.02, warmup_epochs=0.05)
  return c
