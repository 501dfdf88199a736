# nemo_aligner on NVIDIA's PyTorch container (CUDA, cuDNN, NCCL and TransformerEngine preinstalled).
# Not built or run by this project's CI (no docker and no GPU there): a starting point, not a validated image.
# Build: docker build -t nemo-aligner .
# Run:   docker run --gpus all --ipc=host -it nemo-aligner
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.09-py3
FROM ${BASE_IMAGE}

# The megatron-core version CI validates (on a CPU); newer releases may work but are untested.
ARG MCORE_VERSION=0.16.1

WORKDIR /opt/nemo-aligner
COPY . .
# The container's torch and TransformerEngine are kept (its pip constraints pin them); the [gpu] extra declares
# TransformerEngine, [wandb] the W&B logger. The import check fails the build if TransformerEngine is unusable.
RUN pip install --no-cache-dir "megatron-core==${MCORE_VERSION}" -e ".[gpu,wandb]" \
    && python -c "import megatron.core, transformer_engine.pytorch, nemo_aligner"

ENV HYDRA_FULL_ERROR=1
