"""Pure rules: functions from (state, event, policy) to (decision, changes). No I/O here."""
