-- minichat schema v9: a chat's turn order is a stored fact (docs/contract.md, "Read API").
--
-- `turn_seq` numbers a chat's turns in the order the engine applied the commands that started
-- them (1, 2, ...; a retry or an edit starts a new turn at the end). Event times cannot give that
-- order: a gateway sends the next question in the millisecond its answer is acknowledged, and
-- two producers' clocks may even disagree. The engine assigns it on insert (the chat's highest
-- number + 1, under the batch's locks), so a rebuild that applies the same records in the same
-- order stores the same numbers. Rows written by other means (fixtures, the bench's ceiling)
-- keep the default 0 and sort by their start time. Existing turns are numbered by their start.
ALTER TABLE chat_turns ADD COLUMN turn_seq bigint NOT NULL DEFAULT 0 CHECK (turn_seq >= 0);

UPDATE chat_turns t
SET turn_seq = n.seq
FROM (SELECT id, row_number() OVER (PARTITION BY chat_id ORDER BY started_at, id) AS seq
      FROM chat_turns) n
WHERE t.id = n.id;

-- The engine's "latest turn" (retry, edit, delete, the one-running-turn rule) follows the same
-- order, so this index replaces the one by start time: one index per turn row, as before.
CREATE INDEX idx_chat_turns_chat_seq ON chat_turns (chat_id, turn_seq DESC);
DROP INDEX idx_chat_turns_chat_started;
