"""The example LLM application built on llmgine-celery."""
