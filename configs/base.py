"""Fields every training config has, with their defaults.

Configs are Python (ml_collections), as in flax/examples/imagenet: each
`configs/<name>.py` has a `get_config()` starting from `base.get_config()`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Data.
  c.dataset = "fashion_mnist"  # TFDS catalog name.
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  c.num_train_examples = ml_collections.FieldReference(None, field_type=int)
  c.num_eval_examples = ml_collections.FieldReference(None, field_type=int)
  # The last `validation_examples` training images are held out from training
  # (0: none); eval_split='validation' evaluates on them, 'test' on the test
  # set. Choose hyperparameters on 'validation'; report 'test' once.
  c.validation_examples = 0
  c.eval_split = "test"
  c.augment = True  # random crop (+ flip where the dataset allows)
  # Model and quantization.
  c.framework = "linen"  # the Flax API of the model: "linen" or "nnx"
  c.model = "cifar_resnet20"
  c.width = 1.0  # filter multiplier
  # One string picks the whole model's quantization (config.parse_spec):
  # 'float', 'bf16', '[METHOD:]wWaA[_flB]', e.g. 'w4a4', 'lsq:w4a4_fl8'.
  c.quant = "w4a4"
  c.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
  # Optimisation.
  c.optimizer = "sgd"  # 'sgd' (Nesterov momentum) or 'adamw'
  c.learning_rate = 0.1
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4  # kernels (and PACT clips) only
  c.label_smoothing = 0.0
  c.warmup_epochs = 1.0
  c.num_epochs = 10.0
  c.batch_size = 128
  c.eval_batch_size = 500
  c.quant_lr_multiplier = 1.0  # learning rate of quantizer params / model's
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  c.seed = 0
  # Logging and checkpoints.
  c.log_every_steps = 100
  c.eval_every_steps = 0  # 0: only at the end
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  return c
