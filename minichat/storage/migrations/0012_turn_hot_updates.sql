-- minichat schema v12: a turn's progress, terminal and usage updates are HOT (heap-only tuples).
--
-- PostgreSQL can update a row in place on its page, without a new entry in every index, only when
-- no column that an index keys on or filters by (a partial index's predicate) changes. The
-- indexes of migration 0001 filtered by `state`, `settled_at`, `deleted_at`,
-- `last_progress_seen_at` and `terminal_seen_at`, which nearly every update of a turn changes.
--
-- The watchdog's two scans (orphaned running turns, terminal turns past the usage grace) now walk
-- one partial index of the *open* turns — not settled yet — keyed by the start time, which never
-- changes, and filter by state and the processing clock on the heap: the open set is small (the
-- turns in flight and those waiting for their usage report). Only a turn's settlement leaves the
-- set (its one update that is not HOT); a turn settled in the batch that started it is inserted
-- settled and never enters it.
CREATE INDEX idx_chat_turns_open ON chat_turns (started_at) WHERE settled_at IS NULL;
DROP INDEX idx_chat_turns_orphan_scan;
DROP INDEX idx_chat_turns_awaiting_usage;

-- At most one running live turn per chat. A unique partial index on `state` cannot keep updates
-- HOT, so a trigger checks the rule whenever a row becomes a running live turn (an insert; no
-- update ever turns a row back to running, and one that would is checked too) and refuses it as a
-- unique violation, as the index did. It reads the statement's snapshot: it guards the engine's
-- sequential path; two concurrent writers of one chat are excluded by the engine itself (a chat
-- lives on one partition, applied by its one owner under the chat's request and user locks).
CREATE FUNCTION chat_turns_one_running() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT FROM chat_turns t
        WHERE t.chat_id = NEW.chat_id AND t.id <> NEW.id AND t.state = 'running' AND t.deleted_at IS NULL
    ) THEN
        RAISE EXCEPTION 'chat % has a running turn already', NEW.chat_id
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'chat_turns_one_running';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER chat_turns_one_running_insert BEFORE INSERT ON chat_turns
    FOR EACH ROW WHEN (NEW.state = 'running' AND NEW.deleted_at IS NULL)
    EXECUTE FUNCTION chat_turns_one_running();
CREATE TRIGGER chat_turns_one_running_update BEFORE UPDATE OF state, deleted_at ON chat_turns
    FOR EACH ROW WHEN (NEW.state = 'running' AND NEW.deleted_at IS NULL
                       AND (OLD.state <> 'running' OR OLD.deleted_at IS NOT NULL))
    EXECUTE FUNCTION chat_turns_one_running();

DROP INDEX idx_chat_turns_running;

-- Room on each page for a row's next versions: a HOT update needs free space on the row's own
-- page. Applies to pages written from now on.
ALTER TABLE chat_turns SET (fillfactor = 80);
