"""Celery tunables of the example application (``LLMGINE_CELERY_CONFIG=config.celery``).

The framework's guarantees (JSON only, late acks, requeue on worker loss) are
applied by ``llmgine_celery`` itself and cannot be weakened here.
"""

#: LLM calls are long: take one message at a time per process
worker_prefetch_multiplier = 1
#: a hard ceiling on one handler run, and a soft one it can catch
task_time_limit = 300
task_soft_time_limit = 270
#: keep command results for a day so late callers can fetch them by id
result_expires = 24 * 3600
#: recycle prefork children that leak memory in client libraries
worker_max_tasks_per_child = 1000
