FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY llmgine_celery ./llmgine_celery
COPY tasks ./tasks
COPY config ./config
RUN pip install --no-cache-dir . && useradd --create-home llmgine
USER llmgine
CMD ["celery", "-A", "tasks.app:celery", "worker", "-l", "INFO"]
