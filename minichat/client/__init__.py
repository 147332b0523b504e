"""The gateway's side of minichat: commands in, decisions back, provider facts out.

```python
async with GatewayClient("kafka:9092", topic_prefix="minichat.") as client:
    decision = await client.request_turn(
        tenant_id=tenant, chat_id=chat, user_id=user, request_id=request, content="Hello", model="gpt-5-mini"
    )
    if decision.decision in ("allow", "downgrade"):
        ...  # call decision.effective_model with at most decision.max_output_tokens
        await client.completed(tenant_id=tenant, chat_id=chat, request_id=request, content=answer,
                               usage=Usage(input_tokens=12, output_tokens=80))
```

Every record is keyed by `chat_id` (Kafka's default murmur2 partitioner places it), produced
idempotently with `acks=all`; a call returns once the broker acknowledged it. A command's call
then waits for its `turn.decision`. To find it, the client reads only the `turn-decisions`
partitions of the chats it has commands in flight for (the processor keys decisions by chat too),
from the end offset taken before the command was sent: a gateway instance never reads the
decisions of every chat, however many instances there are.

A repeated command (same ids) is answered with the stored decision, `replay: true`: retrying a
call after a timeout is always safe. `DecisionTimeout` means no decision arrived in time, not that
none will: the command is in the log and will be decided; look it up later with the read API
(`GET /v1/chats/{chat_id}/turns/{request_id}`) or by sending the same command again.

The modules: `gateway.py` (`GatewayClient`), `decisions.py` (the reader of `turn-decisions`),
`messages.py` (the command and fact types), `codes.py` (`FailureCode`, `RejectCode`),
`reader.py` (`ReadClient`: the read API, e.g. the spend report `usage(...)`). Ids are
`uuid.UUID`s or their text. Import from `minichat.client`.
"""

from minichat.client.codes import FailureCode, RejectCode
from minichat.client.decisions import IDLE_S, DecisionReader, partition_of
from minichat.client.gateway import DecisionTimeout, GatewayClient, MissingTopicError
from minichat.client.messages import FACT_TYPES, Command, Fact, Id, as_uuid, decision_json, envelope
from minichat.client.reader import ReadApiError, ReadClient, SpendRow

__all__ = [
    "FACT_TYPES",
    "IDLE_S",
    "Command",
    "DecisionReader",
    "DecisionTimeout",
    "Fact",
    "FailureCode",
    "GatewayClient",
    "Id",
    "MissingTopicError",
    "ReadApiError",
    "ReadClient",
    "RejectCode",
    "SpendRow",
    "as_uuid",
    "decision_json",
    "envelope",
    "partition_of",
]
