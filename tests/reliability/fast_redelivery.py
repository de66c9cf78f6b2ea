"""Celery config for the worker-loss tests: Redis gives unacked messages back after 5 s.

kombu's Redis transport returns a message a dead worker held only after the
visibility timeout (an hour by default), scanning for such messages every
``unacked_restore_interval * unacked_restore_throttle`` seconds (100 by
default). Never this short in production: a task running longer than the
visibility timeout would be delivered twice.
"""

broker_transport_options = {
    "visibility_timeout": 5,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
}
