"""aqt_ext: quantization-aware training for JAX/Flax.

Extras: the core (quantizers, layers, cost, PTQ, export) needs only the base
requirements; `train` brings the training stack (TFDS, clu, orbax, ...);
`test` brings pytest and `aqtp` (AQT v2, used as a numerics oracle);
`serve` brings onnx and onnxruntime (`aqt_ext.export.onnx`).
"""

from setuptools import find_packages, setup

CORE = ["jax>=0.10", "flax>=0.12", "optax>=0.2.8", "numpy", "ml-collections"]
TRAIN = [
    "absl-py", "clu", "tensorflow-cpu", "tensorboard", "tensorflow-datasets",
    # TFDS 4.9.10 imports importlib_resources without declaring it.
    "importlib_resources", "grain", "orbax-checkpoint", "matplotlib",
]
TEST = ["pytest", "pytest-xdist", "aqtp", "scikit-learn"]
SERVE = ["onnx", "onnxruntime"]

setup(
    name="aqt_ext",
    version="0.1.0",
    description="Quantization-aware training for JAX/Flax",
    packages=find_packages(include=["aqt_ext", "aqt_ext.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"train": TRAIN, "test": TEST, "serve": SERVE,
                    "all": TRAIN + TEST + SERVE},
)
