# A goldstream worker image: docker compose builds it for the `worker` service.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY goldstream ./goldstream
COPY schemas ./schemas
COPY scoring ./scoring
COPY streams ./streams
RUN pip install . && useradd --system --uid 10001 goldstream
USER goldstream
ENTRYPOINT []
CMD ["goldstream", "--help"]
