# The Vigil image: the project installed, serving every registered model on :3000.
#
# Two targets (docker-compose.yml builds both):
#   service   what runs: `vigil serve`, and the drift job (`vigil drift run`) from the same image;
#   examples  one-shot: trains the example models from scikit-learn's bundled datasets and registers
#             them into /app/models (skipping those already registered), so `docker compose up` has
#             something to serve on a fresh checkout.
FROM python:3.11-slim AS service
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 BENTOML_DO_NOT_TRACK=True \
    VIGIL_REGISTRY=/app/models VIGIL_DATA_DIR=/data
COPY pyproject.toml README.md ./
COPY service/ service/
COPY monitoring/ monitoring/
RUN pip install .
# The registry is normally mounted over this (docker-compose.yml); the copy makes the image usable alone.
COPY models/ models/
# The service runs as an unprivileged user, the same uid and gid the Kubernetes manifests set
# (runAsUser); it owns only what it writes: the data directory (a volume) and its home (BentoML's).
RUN groupadd --system --gid 10001 vigil \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/vigil vigil \
    && mkdir -p /data && chown vigil:vigil /data
USER 10001:10001
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2)"
CMD ["vigil", "serve", "--host", "0.0.0.0", "--port", "3000"]

FROM service AS examples
# Root: it installs packages, and registers into the bind-mounted ./models, owned by whoever checked it out.
USER root
RUN pip install ".[examples]"
COPY examples/ examples/
HEALTHCHECK NONE
CMD ["python", "examples/train.py", "--register", "--registry", "/app/models", "--out", "/tmp/examples"]
