"""Installs the backdoor_jax library (CPU JAX by default; see BUILD.md for GPU/TPU)."""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "tensorflow-datasets>=4.9.6",
    "grain>=0.2.10",
    "chex>=0.1.88",
    "ml-collections>=0.1.1",
    "absl-py>=2.1",
    "einops>=0.8",
    "numpy>=1.26",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "pillow>=10",
    "tqdm>=4.66",
    "safetensors>=0.4",  # torchvision weights without torch (backdoor_jax.models.torchvision_import)
]

EXTRAS = {
    "cuda12": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
    "tf": ["tensorflow-cpu"],
    "test": ["pytest>=8", "pytest-xdist>=3.5"],
    "bench": ["torch==2.13.0"],
}

setuptools.setup(
    name="backdoor-jax",
    version="0.1.0",
    description="Backdoor attacks on image classifiers and their explanations, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["backdoor_jax", "backdoor_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    license="Apache-2.0",
)
