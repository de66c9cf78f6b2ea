"""Celery settings for a test worker: task events off (Celery's own default)."""

worker_send_task_events = False
