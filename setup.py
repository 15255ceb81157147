"""Build of adapprox_kernels: pure Python, plus the optional csrc/ extension (another module)."""

from setuptools import find_packages, setup

setup(
    name="adapprox_kernels",
    version="0.1.0",
    description="Adapprox and AdaMeM optimizers with fused Triton kernels and a batched S-RSI extension",
    packages=find_packages(include=["adapprox_kernels", "adapprox_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "main": ["matplotlib", "tqdm", "came-pytorch"]},
)
