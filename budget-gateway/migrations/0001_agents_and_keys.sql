-- Agents and API keys managed through the admin API.
--
-- One schema for SQLite and PostgreSQL: ids are UUIDs as text, times are
-- milliseconds since the Unix epoch, a key is kept as the hex of its
-- SHA-256, and an agent's limits are a JSON list of limit specs (text), so
-- that new kinds of limits need no new column.
--
-- Every change bumps `revision` (one row) first, in the change's own
-- transaction, and stamps the rows it writes with the new value: writers
-- take turns on that row, and a gateway that has seen revision R has seen
-- every row stamped R or less. Deleted agents and revoked keys stay as
-- tombstones, so that other gateways learn of the deletion by the same
-- stamp.

CREATE TABLE revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO revision (id, value) VALUES (1, 0);

CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY,
    parent TEXT NULL REFERENCES agents (agent_id),
    metrics_label TEXT NULL,
    limits TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT NULL,
    revision BIGINT NOT NULL
);
CREATE INDEX agents_by_revision ON agents (revision);
CREATE INDEX agents_by_parent ON agents (parent);

CREATE TABLE api_keys (
    key_id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents (agent_id),
    name TEXT NULL,
    shown TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT NULL,
    revoked_at BIGINT NULL,
    revision BIGINT NOT NULL
);
CREATE INDEX api_keys_by_agent ON api_keys (agent_id);
CREATE INDEX api_keys_by_revision ON api_keys (revision);
