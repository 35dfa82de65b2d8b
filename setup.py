"""Distribution `unimod-train`: task-aware Mixture-of-Depths training for Emu3-style unified models.

Ranges stay open so GPU users get the CUDA builds they already have; the CPU venv made by
scripts/setup.sh pins exact versions from constraints.txt.
"""
from setuptools import find_packages, setup

setup(
    name="unimod-train",
    version="0.1.0",
    description="DeepSpeed training of Emu3-architecture unified multimodal transformers with task-aware Mixture-of-Depths",
    python_requires=">=3.10",
    packages=find_packages(include=["model", "model.*", "data", "data.*", "train", "train.*", "analysis", "analysis.*", "tools", "tools.*"]),
    package_data={"train": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=4.48",  # Emu3 landed in 4.48
        "safetensors>=0.4",
        "webdataset>=0.2.90",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "pyyaml>=6",
        "numpy>=1.24",
        "scikit-learn>=1.3",
        "pillow>=10",
        "tqdm>=4.60",
        "accelerate>=0.30",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "matplotlib>=3.8"],
    },
)
