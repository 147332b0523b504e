-- minichat schema v4: quota counters a month of one user's reports cannot overflow.
--
-- A usage report may carry up to 10,000,000 tool calls; about 215 of them in one user's month
-- passed `integer` (2^31 - 1) and PostgreSQL refused the settlement. `bigint` holds 2^63 - 1:
-- more than 900 billion maximal reports. Per-turn columns stay `integer`: one report's bounds fit.
ALTER TABLE quota_usage
    ALTER COLUMN calls                  TYPE bigint,
    ALTER COLUMN file_search_calls      TYPE bigint,
    ALTER COLUMN web_search_calls       TYPE bigint,
    ALTER COLUMN code_interpreter_calls TYPE bigint,
    ALTER COLUMN rag_retrieval_calls    TYPE bigint,
    ALTER COLUMN image_inputs           TYPE bigint;
