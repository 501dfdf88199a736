# The one image of nemo_aligner (docs/multi_node.md, "The container"): NVIDIA's PyTorch container (CUDA, cuDNN,
# NCCL and TransformerEngine preinstalled) + megatron-core at the version we test + this package.
# Not built by this project's CI (no docker and no GPU there); the same versions are what CI and
# `.gpu/run_on_gpu.sh` test.
# Build:         docker build -t nemo-aligner:0.1.0 .
# Run:           docker run --gpus all --ipc=host -it nemo-aligner:0.1.0
# Slurm (pyxis): enroot import -o nemo_aligner.sqsh dockerd://nemo-aligner:0.1.0
#                then CONTAINER=/path/to/nemo_aligner.sqsh sbatch examples/nlp/gpt/slurm/dpo.sbatch
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.09-py3
FROM ${BASE_IMAGE}

# The megatron-core version CI validates (on a CPU). setup.py allows up to 0.19.x, whose API differences live in
# nemo_aligner/utils/mcore_compat.py; build with --build-arg MCORE_VERSION=0.19.2 only once `.gpu/run_on_gpu.sh`
# has passed with it (not yet run on a GPU).
ARG MCORE_VERSION=0.16.1

WORKDIR /opt/nemo-aligner
COPY . .
# The container's torch and TransformerEngine are kept (its pip constraints pin them); the [gpu] extra declares
# TransformerEngine, [wandb] the W&B logger. The import check fails the build if TransformerEngine is unusable.
RUN pip install --no-cache-dir "megatron-core==${MCORE_VERSION}" -e ".[gpu,wandb]" \
    && python -c "import megatron.core, transformer_engine.pytorch, nemo_aligner"

ENV HYDRA_FULL_ERROR=1
