"""Celery config for the worker-loss tests: Redis gives unacked messages back after 2 s.

kombu's Redis transport returns a message a dead worker held only after the
visibility timeout (an hour by default). Never this short in production: a
task running longer than it would be delivered twice.
"""

broker_transport_options = {"visibility_timeout": 2}
