# nemo_aligner on NVIDIA's PyTorch container (CUDA, NCCL, TransformerEngine and apex preinstalled).
# Build: docker build -t nemo-aligner .
# Run:   docker run --gpus all --ipc=host -it nemo-aligner
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /opt/nemo-aligner
COPY . .
# The container's torch and TransformerEngine are kept; pip adds megatron-core and the rest.
RUN pip install --no-cache-dir -e ".[wandb]"

ENV HYDRA_FULL_ERROR=1
