# The GPU image for precompute daemons: ONNX Runtime's CUDA provider on CUDA 12 and cuDNN 9.
#   docker build -f k8s/images/solaris-cuda.Dockerfile -t solaris-cuda:0.1.0 .
# The reference model is exported at build time into /models.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY server server
COPY precompute precompute
# torch is only used to export the model here; its CPU wheel keeps the image smaller.
RUN pip3 install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip3 install ./protos './[model]' \
 && python3 -c "from solaris.precompute.export import reference_model; reference_model('/models')" \
 && useradd --uid 10001 --user-group --no-create-home solaris

USER 10001:10001
WORKDIR /models
ENV SOLARIS_MODEL_DIR=/models SOLARIS_DEVICE=cuda
EXPOSE 9400
CMD ["solaris", "precompute"]
