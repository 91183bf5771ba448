"""Direct Quantization ablation, v2 (experiments/dq_ablation_v2/): the
direct weight update and its latent-STE twin, hyperparameters chosen on a
validation split, 3 seeds.

CIFAR-style ResNet-8 (width 0.5) on Fashion-MNIST at W2A2 and W3A3 (first
and last layer at 8 bits, uniform) for uniform STE, PACT, LSQ, DQ weights
only (direct / latent STE: ``dqw`` / ``dqwste``), DQ activations only
(``dqa``) and DQ both (``dq`` / ``dqste``), plus float; seeds 0, 1, 2.

Every point fine-tunes the same float checkpoint (``base.init_from``:
experiments/dq_ablation_v2/float.sh, trained on the first 55,000 training
images) for half an epoch (215 steps of 128), SGD + Nesterov with a short
warmup and cosine decay, no augmentation; the seed changes the data order.
Points are evaluated on the validation split (the last 5,000 training
images) every 72 steps and at the end, so the ranking can be read at a
third, two thirds and all of the budget. The learning rate is a flag
(``--config.base.learning_rate``), chosen on the validation split
(experiments/dq_ablation_v2/README.md).

  python -m aqt_ext.sweep --config=configs/sweep_dq_ablation_v2.py \\
      --config.base.init_from=/tmp/dqv2_float --workdir=DIR
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = base.get_config()
  b = c.base
  b.dataset = "fashion_mnist"
  b.model = "cifar_resnet8"
  b.width = 0.5
  b.augment = False
  b.validation_examples = 5000
  b.eval_split = "validation"
  b.num_epochs = 0.5  # 215 steps of 128 on 55,000 images
  b.batch_size = 128
  b.learning_rate = 0.03
  b.warmup_epochs = 0.05
  b.eval_batch_size = 1000
  b.eval_every_steps = 72
  b.log_every_steps = 72
  b.checkpoint_every_steps = 72
  c.models = (("cifar_resnet8", 0.5),)
  c.quants = ("float", "w2a2", "w3a3")
  c.first_last = (8,)
  c.methods = ("uniform", "pact", "lsq", "dqw", "dqwste", "dqa", "dq",
               "dqste")
  c.seeds = (0, 1, 2)
  return c
