# The Vigil service image: the project installed, the registry baked in, served on :3000.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service/ service/
COPY monitoring/ monitoring/
RUN pip install --no-cache-dir .
COPY models/ models/
ENV VIGIL_REGISTRY=/app/models VIGIL_DATA_DIR=/data BENTOML_DO_NOT_TRACK=True
EXPOSE 3000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:3000/readyz', timeout=2)"
CMD ["vigil", "serve", "--host", "0.0.0.0", "--port", "3000"]
