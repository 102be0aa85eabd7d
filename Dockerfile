# StrongHold-Megatron on an NVIDIA PyTorch image (CUDA, cuDNN, NCCL and a tuned torch; apex where
# the image still ships it, which the trainer uses when present and does without otherwise).
#
#   docker build -t stronghold-megatron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it \
#       -v $PWD/results:/workspace/stronghold-megatron/results stronghold-megatron examples/case3.sh
#
# --ipc=host and an unlimited memlock: StrongHold pins host memory for its copies.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.08-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/stronghold-megatron

# megatron-core and deepspeed declare a torch requirement: --no-deps keeps pip from replacing the
# image's CUDA torch with a PyPI build. Their other requirements do not depend on torch.
RUN pip install --no-cache-dir --no-deps megatron-core==0.16.1 deepspeed==0.19.8 && \
    pip install --no-cache-dir hjson py-cpuinfo msgpack einops "pydantic>=2" tqdm ninja \
        nvidia-ml-py psutil regex pybind11 matplotlib

COPY . .
RUN pip install --no-cache-dir --no-deps -e . && \
    python -c "import torch, megatron.core, deepspeed, megatron.stronghold; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__)"

ENV PYTHON=python
CMD ["bash", "-c", "examples/run.sh --help; echo; echo 'Paper experiments: examples/case1.sh ... examples/case5.sh (each takes --help); results go to results/.'"]
