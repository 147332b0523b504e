"""Kafka wiring: the faust app, agents, timers, the outbox relay, retries and dead letters."""
