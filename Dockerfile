# syntax=docker/dockerfile:1
# The BLDA segmentation service on CPU: numpy core + FastAPI + onnxruntime, no torch.
#   docker build -t blda-service:0.1.0 .
#   docker run -p 8000:8000 blda-service:0.1.0
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Sources first, models last: a new bundle does not invalidate the dependency layer.
COPY pyproject.toml README.md ./
COPY blda ./blda
COPY calibration ./calibration
COPY service ./service
COPY training ./training
RUN pip install ".[serve,redis]"

COPY models ./models

RUN useradd --system --uid 10001 --no-create-home blda
USER blda

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"

# Two workers share one port; /metrics sums them (the CLI creates PROMETHEUS_MULTIPROC_DIR).
CMD ["blda", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--models-dir", "/app/models"]
