"""The full-size Pareto study on Fashion-MNIST (defined here, not run: see
sweep_fashion_mnist_cpu.py for the one run on 2 CPU cores).

Seven CIFAR-style ResNet sizes (depth 8..56, width 0.5..2) x {float, w8a8,
w4a4, w3a3, w2a2} (first/last layer at 8 bits) x {uniform, LSQ} QAT x 3
seeds: 7 x (1 + 4 x 2) x 3 = 189 points, each 30 epochs of the full training
set with augmentation. Meant for GPUs or a SLURM cluster:

  python -m aqt_ext.sweep --config=configs/sweep_fashion_mnist.py \\
      --workdir=/shared/sweeps/fmnist --executor=slurm \\
      --config.slurm.partition=gpu
  # or locally: python -m aqt_ext.sweep --config=configs/sweep_fashion_mnist.py
  #   --workdir=DIR
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = base.get_config()
  b = c.base
  b.dataset = "fashion_mnist"
  b.augment = True
  b.num_epochs = 30.0
  b.batch_size = 128
  b.learning_rate = 0.1
  b.warmup_epochs = 1.0
  b.weight_decay = 5e-4
  b.eval_batch_size = 1000
  b.log_every_steps = 100
  b.checkpoint_every_steps = 1000
  c.models = (("cifar_resnet8", 0.5), ("cifar_resnet8", 1.0),
              ("cifar_resnet14", 1.0), ("cifar_resnet20", 1.0),
              ("cifar_resnet20", 2.0), ("cifar_resnet32", 1.0),
              ("cifar_resnet56", 1.0))
  c.quants = ("float", "w8a8", "w4a4", "w3a3", "w2a2")
  c.first_last = (8,)
  c.methods = ("uniform", "lsq")
  c.seeds = (0, 1, 2)
  # --executor=slurm: one GPU per point (edit for your cluster, or
  # override, e.g. --config.slurm.partition=a100 --config.slurm.account=me).
  c.slurm = ml_collections.ConfigDict(dict(
      partition="gpu", time="08:00:00", cpus_per_task=8, gpus_per_task=1,
      max_parallel=0, points_per_task=1))
  return c
