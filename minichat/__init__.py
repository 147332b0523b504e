"""minichat: a Kafka stream processor for multi-tenant LLM chat turns, quotas and billing."""
