"""The wire contract: pydantic models of every event and of the policy file."""
