"""One conversation end to end, as a gateway plays it with `minichat.client`.

    MINICHAT_KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:9092 python examples/gateway.py

A running worker answers (`make demo` starts one, or `minichat worker`). The model call is faked:
a gateway would stream from the provider between the decision and `completed`.
"""

from __future__ import annotations

import asyncio
import os
import uuid

from minichat.client import GatewayClient
from minichat.models.events import Usage


async def main() -> None:
    bootstrap = os.environ.get("MINICHAT_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    prefix = os.environ.get("MINICHAT_TOPIC_PREFIX", "minichat.")
    tenant, user, chat = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with GatewayClient(bootstrap, prefix) as client:
        for question in ("What is Kafka?", "And PostgreSQL?"):
            request = uuid.uuid4()
            decision = await client.request_turn(
                tenant_id=tenant,
                chat_id=chat,
                user_id=user,
                request_id=request,
                content=question,
                model="gpt-5-mini",
            )
            reserved = decision.reserved_credits_micro
            print(f"{question!r}: {decision.decision} on {decision.effective_model}, reserved {reserved}")
            if decision.decision not in ("allow", "downgrade"):
                return
            await client.progress(tenant_id=tenant, chat_id=chat, request_id=request)  # first tokens streamed
            answer = f"(the model's answer to {question!r})"
            usage = Usage(input_tokens=len(question), output_tokens=len(answer))
            await client.completed(
                tenant_id=tenant, chat_id=chat, request_id=request, content=answer, usage=usage
            )
            print("  completed: the turn settles and billing gets one usage.settled")
        done = await client.delete_chat(tenant_id=tenant, chat_id=chat, user_id=user)
        print(f"chat deleted: {done.decision}")


if __name__ == "__main__":
    asyncio.run(main())
