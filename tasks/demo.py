"""The demo: the example application end to end on the embedded default.

``llmgine-celery demo`` runs it; with nothing configured it needs no server
(broker and results live under ./.llmgine, the worker runs in this process).
"""

from __future__ import annotations

import os

from llmgine_celery import ApplicationConfig
from tasks.app import LLMApplication
from tasks.messages import AskModel, CountTokens


async def main() -> None:
    app = LLMApplication(ApplicationConfig(name="llm-app"))
    await app.bootstrap()
    print(f"demo: application {app.name} on {app.celery.conf.broker_url.split(':')[0]}://")
    try:
        answer = await app.message_bus.execute(
            AskModel(prompt="celery carries every command", session_id="demo-session")
        )
        print(f"AskModel -> success={answer.success} result={answer.result!r}")
        count = await app.message_bus.execute(CountTokens(text="one two three four"))
        print(f"CountTokens -> success={count.success} result={count.result!r}")
        handle = app.message_bus.send(CountTokens(text="sent now, fetched later"))
        later = await handle.wait(timeout=30)
        print(f"send + fetch by id {handle.command_id} -> result={later.result!r}")
        if app.settings.runs_embedded_worker:
            print(f"demo: handled by the embedded worker, in this process ({os.getpid()})")
    finally:
        await app.shutdown()
    print(f"demo: records in {app.settings.logs}; the first command's causal tree:")
    print(f"  llmgine-celery trace {answer.command_id}")
    print("demo: done")
