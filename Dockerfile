# StrongHold-Megatron on an NVIDIA PyTorch image (CUDA, cuDNN, NCCL and a tuned torch; apex where
# the image still ships it, which the trainer uses when present and does without otherwise).
#
#   docker build -t stronghold-megatron .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --rm -it \
#       -v $PWD/results:/workspace/stronghold-megatron/results stronghold-megatron examples/case3.sh
#
# --ipc=host and an unlimited memlock: StrongHold pins host memory for its copies. Tokenizers are read from
# local files only (nothing is downloaded): mount the corpus and the tokenizer directory, e.g.
#   docker run --rm -v $PWD/data:/data stronghold-megatron python tools/preprocess_data.py \
#       --input /data/corpus.jsonl --output-prefix /data/corpus --tokenizer-type HuggingFaceTokenizer \
#       --tokenizer-model /data/tokenizer --append-eod --workers 8
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.08-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/stronghold-megatron

# megatron-core and deepspeed declare a torch requirement: --no-deps keeps pip from replacing the
# image's CUDA torch with a PyPI build. Their other requirements do not depend on torch.
RUN pip install --no-cache-dir --no-deps megatron-core==0.16.1 deepspeed==0.19.8 && \
    pip install --no-cache-dir hjson py-cpuinfo msgpack einops "pydantic>=2" tqdm ninja \
        nvidia-ml-py psutil pybind11 matplotlib "transformers>=5" tokenizers safetensors

COPY . .
RUN pip install --no-cache-dir --no-deps -e . && \
    python -c "import torch, megatron.core, deepspeed, transformers, megatron.stronghold; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"

ENV PYTHON=python
CMD ["bash", "-c", "examples/run.sh --help; echo; echo 'Paper experiments: examples/case1.sh ... examples/case5.sh (each takes --help); results go to results/.'"]
