# The CPU image for precompute daemons: solaris with its `model` extra (ONNX Runtime, and the
# PyTorch that exports the reference model).
#   docker build -f k8s/images/solaris-precompute.Dockerfile -t solaris-precompute:0.1.0 .
# The reference model is exported at build time into /models, so nothing is written at run
# time (the containers run with a read-only root filesystem).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY server server
COPY precompute precompute
COPY clients clients
# PyTorch's CPU wheel (the default one carries CUDA libraries the CPU image does not need).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install ./protos './[model]' \
 && python -c "from solaris.precompute.export import reference_model; reference_model('/models')" \
 && useradd --uid 10001 --user-group --no-create-home solaris

USER 10001:10001
WORKDIR /models
ENV SOLARIS_MODEL_DIR=/models
EXPOSE 9400
CMD ["solaris", "precompute"]
