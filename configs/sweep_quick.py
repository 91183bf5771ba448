"""Quick Pareto sweep: Fashion-MNIST, 3 small CIFAR-style ResNets x
{float, w8a8, w4a4, w2a2} (first/last layer at 8 bits), uniform QAT, 1 seed.

12 points on a short budget (no augmentation, 2 epochs of the first 12,800
training examples = 200 steps of 128, full 10,000-image test set): about 13
CPU-minutes in all, i.e. about 7-15 minutes on 2 idle CPU cores with 2
workers (longer when the cores are shared):

  python -m aqt_ext.sweep --config=configs/sweep_quick.py --workdir=DIR
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = base.get_config()
  b = c.base
  b.dataset = "fashion_mnist"
  b.augment = False
  b.num_train_examples = 12_800
  b.num_epochs = 2.0  # 200 steps of 128
  b.batch_size = 128
  b.learning_rate = 0.5  # short budget: 0.5 beat 0.1 (and adamw) in trials
  b.warmup_epochs = 0.2
  b.eval_batch_size = 1000
  b.log_every_steps = 50
  b.checkpoint_every_steps = 50
  c.models = (("cifar_resnet8", 0.25), ("cifar_resnet8", 0.5),
              ("cifar_resnet14", 0.5))
  c.quants = ("float", "w8a8", "w4a4", "w2a2")
  c.first_last = (8,)
  c.methods = ("uniform",)
  c.seeds = (0,)
  return c
