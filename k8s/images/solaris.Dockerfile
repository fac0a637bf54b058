# The sidecar image: `solaris serve --precompute false` beside each ranker, and the example
# ranker. No model stack: no PyTorch, ONNX or ONNX Runtime (the daemons have their own images).
#   docker build -f k8s/images/solaris.Dockerfile -t solaris:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY server server
COPY precompute precompute
COPY clients clients
RUN pip install ./protos ./clients . \
 && mkdir -p /app && cp -r clients/examples /app/examples \
 && useradd --uid 10001 --user-group --no-create-home solaris

USER 10001:10001
WORKDIR /app
EXPOSE 50051 9400
ENTRYPOINT []
CMD ["solaris", "serve", "--precompute", "false"]
