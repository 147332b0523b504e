"""`minichat replay`: the input topics again, through the worker's own processors.

Called a *rebuild* in the code (`run_rebuild`, `RebuildSummary`): it rebuilds the state from the
input log. Not to be confused with a re-sent decision, which the contract marks `replay: true`
(`domain/admission.py`'s `REPLAY`); the command keeps its name.

What it does
------------
* Reads `turn-requests`, `provider-responses` and `usage` from the beginning (or from the first
  record at or after `--from-time`, found with `offsets_for_times`) up to the end offsets taken
  when it starts, then exits. No consumer group at all: partitions are assigned by hand and no
  offset is ever committed, and the workers' stored positions are neither read nor written.
* Stores the policy version first (`ensure_policy_version`), as the worker does at start: a
  rebuild into an empty, migrated database can then admit and settle.
* Takes the input partitions' end offsets first, then reads `turn-decisions` up to its end
  offsets taken after those, into a temporary table: every command of the range that a worker had
  decided when the rebuild started has its decision there (taken the other way round, the
  commands arriving between the two reads would be decided afresh). A command that has a recorded
  decision is applied as decided (decision, effective model, reserve, policy version); only a
  command with none is decided afresh, and counted (`decided afresh`). Quota rows are shared by a
  user's chats on every partition, so deciding again could differ from what the live workers
  decided.
* Then reads `quota-alerts` up to its end offsets (taken after the inputs' too; a missing or
  empty topic is fine) and stores every valid alert as recorded, with its outbox row, where the
  database does not hold that threshold yet (`storage/alerts.py`, ON CONFLICT DO NOTHING), before
  the log is applied. Which settlement crossed a threshold (the spend, turn and time an alert
  names) depends on the order in which a user's settlements on different partitions were
  applied, which the rebuild does not know; the settlements then find those thresholds crossed
  and derive only the alerts nothing recorded (e.g. still in the outbox at a crash). Every
  recorded alert is stored whatever `--from-time`: an alert once announced is not announced
  again. A record that is not a valid alert keyed by its tenant is counted (`alerts_ignored`)
  and ignored. `policy diff` derives every alert (`follow_recorded_alerts=False`): it compares
  the candidate's alerts with the recorded ones.
* Merges the input partitions with the worker's own merge (`processors/merge.py`: one ordered
  stream per partition number, (timestamp, topic rank, offset)) and applies the merged batches
  with the worker's own handlers (`processors/batches.py`), one transaction per batch, all on one
  connection. Whatever they produce (decisions, dead letters) is counted, never sent. No watchdog
  and no outbox relay run; the billing outbox is written by the settlement transactions as
  usual, and is idempotent on its dedupe key, so a rebuild over the live database adds no billing
  event.

Counting (what the summary means)
---------------------------------
* `read`: records consumed in the range.
* `applied`: records that changed the state. A command is applied when its decision row is new
  after its batch (every command that changes anything stores its decision in the same
  transaction). A provider or usage event is applied when its turn's row (every covered column of
  `chat_turns`, as the digest sees it) changed in its batch; several events of one turn in one
  batch all count as applied when the turn changed, so this is exact at zero (a rebuild over
  the live database) and an upper bound otherwise.
* `already applied`: records that changed nothing (already applied, or a no-op such as a second
  terminal event or an event of a rejected request).
* `parked`: provider and usage events whose command was not decided when they were processed;
  they are applied when the command is decided later in the rebuild. `still parked` is the
  number of rows of `parked_events` at the end (and at the start): events whose command is not
  in the log range (e.g. with `--from-time`) stay parked.
* `dead-lettered`: records the worker dead-letters; counted, not re-sent.
* `recorded alerts` (`alerts_recorded`): alerts of `quota-alerts` stored as recorded (0 over the
  live database, which holds them).

Running it over the live database is a no-op for the state (digest unchanged, no outbox row
added). Run it when the workers have caught up with the log, or stopped: a record the workers have
not processed yet would be decided by the rebuild first, and the workers would then answer it
with `replay: true`. A warning names the number of such records when the workers' consumer group
is behind the end offsets.

The modules: `sources.py` (what is read of Kafka), `counting.py` (what each record did),
`apply.py` (the merge and the batches), `run.py` (the command end to end).
"""

from minichat.tools.rebuild.counting import RebuildSummary
from minichat.tools.rebuild.run import run_rebuild
from minichat.tools.rebuild.sources import RebuildSetupError, parse_time

__all__ = ["RebuildSetupError", "RebuildSummary", "parse_time", "run_rebuild"]
