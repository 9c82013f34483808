# syntax=docker/dockerfile:1
# One image for `sdq api` and `sdq worker` (target `app`, the default), plus the small
# rq-dashboard image (target `dashboard`). docker-compose.yml builds both.
#
#   docker build -t sdqueue .                                         # CPU torch (default)
#   docker build -t sdqueue:cuda --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#
# PyPI's Linux torch wheels are the CUDA build (they bring their own CUDA libraries, so the host
# needs only the NVIDIA driver and container toolkit); the PyTorch CPU index keeps the default
# image about 2 GB smaller.

FROM python:3.11-slim AS dashboard
# rq-dashboard 0.9 works with rq 2.12 but imports `six` without declaring it.
RUN pip install --no-cache-dir rq-dashboard==0.9.0 rq==2.12.0 redis==8.1.0 six==1.17.0
USER nobody
EXPOSE 9181
CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181", "--json"]


FROM python:3.11-slim AS app
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf
WORKDIR /app

# Torch first and alone: the biggest layer, and the only one that differs between CPU and CUDA.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# Dependencies before the source, so editing sdqueue/ does not reinstall them.
COPY pyproject.toml README.md ./
# accelerate lets diffusers load weights straight into place, without a random-init copy first.
RUN mkdir sdqueue && touch sdqueue/__init__.py \
    && pip install ".[api]" "accelerate==1.15.0" \
    && pip uninstall -y sdqueue && rm -rf sdqueue build
COPY sdqueue ./sdqueue
RUN pip install --no-deps . && rm -rf build

# The offline random-weight pipeline the CPU worker uses by default (its images are noise).
RUN sdq make-tiny-model /models/tiny

# Not root. /hf is the Hugging Face cache; compose mounts a volume (or your own cache) there.
RUN useradd --create-home --uid 1000 sdq && mkdir -p /hf && chown sdq /hf
USER sdq
EXPOSE 8000
CMD ["sdq", "worker"]
