"""nemo_aligner: LLM alignment (SFT, DPO and variants, SPIN, Self-Rewarding) on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

# torch is deliberately not pinned here: on a CPU machine install the CPU wheel first
# (`pip install torch==2.13.0`); NVIDIA's containers already ship a CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.4",
    "megatron-core>=0.16.1,<0.20",  # 0.16.1 in CI; 0.17+ differences in utils/mcore_compat.py
    "psutil",  # megatron-core's checkpoint writer needs it but does not declare it
    "tqdm",
    "lightning>=2.4",
    "hydra-core>=1.3",
    "omegaconf>=2.3",
    "pyyaml",
    "numpy",
    "tokenizers>=0.19",
    "sentencepiece>=0.2",
    "transformers>=4.45",
    "safetensors>=0.4",
    "tensorboard",
    "jinja2",  # judge prompt templates
    "scipy",  # Bradley-Terry (Elo) fit of meta-judge verdicts
    "matplotlib",  # the PNG plots every run writes at its end (imported only then)
]

EXTRAS = {
    "test": ["pytest>=8", "ruff==0.17.6", "wandb", "matplotlib"],
    "wandb": ["wandb"],
    "plot": ["matplotlib"],  # scripts/plot_metrics.py (now also a base dependency; kept for existing commands)
    # benchmarks/: the peers we measure against (TRL's DPOTrainer, Hugging Face generate).
    "bench": ["trl>=1.16", "datasets", "accelerate"],
    # GPU accelerators: used when importable, never required.
    "gpu": ["transformer-engine[pytorch]"],
}

setup(
    name="nemo_aligner",
    version="0.1.0",
    description=__doc__,
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_aligner", "nemo_aligner.*"]),
    package_data={"nemo_aligner.data.embedded": ["*.jsonl", "README.md"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
