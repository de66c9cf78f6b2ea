"""The integration application, in a worker whose task events linger five seconds.

Only the shutdown flush can then deliver the last events in time: the test of
it would pass by luck with the real 50 ms.
"""

from __future__ import annotations

from llmgine_celery.bus import worker_consumer
from tests.integration.apps import app

worker_consumer.EVENTS_LINGER = 5.0

celery = app.celery
