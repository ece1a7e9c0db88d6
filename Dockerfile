# The finetune web app for GPU hosts: CUDA runtime, PyTorch, the package with its app extra, a non-root user.
#
#   docker build -t finetune .
#   docker run --gpus all -p 7860:7860 -v finetune-workspace:/workspace -e FINETUNE_AUTH=admin:change-me finetune
#
# The app refuses to start without a login unless FINETUNE_ALLOW_NO_AUTH=1 is set.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    FINETUNE_WORKSPACE=/workspace \
    FINETUNE_ACCELERATE_CONFIGS=/opt/finetune/configs/accelerate \
    HF_HOME=/workspace/.cache/huggingface

WORKDIR /opt/finetune

# Dependencies first, from pyproject.toml alone, so code changes do not invalidate this layer.
# Versions are bounded by pyproject.toml; pinning them here would duplicate it (hence DL3013 is ignored).
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir -p finetune && touch finetune/__init__.py \
    && pip install --no-cache-dir ".[app,lora]" \
    && pip uninstall -y finetune

COPY finetune ./finetune
COPY configs ./configs
COPY app.py ./
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps . \
    && finetune --help

RUN useradd --create-home --no-log-init --uid 1000 --shell /bin/bash finetune \
    && mkdir -p /workspace \
    && chown finetune:finetune /workspace

USER 1000:1000
WORKDIR /workspace
VOLUME ["/workspace"]
EXPOSE 7860

# Gradio serves its page at / with or without a login, so a 200 there means the server is up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]

ENTRYPOINT ["finetune", "app", "--host", "0.0.0.0", "--port", "7860", "--require-auth"]
CMD ["--workspace", "/workspace"]
