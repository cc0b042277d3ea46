-- Shadow mode: an agent with enforce = 0 has its usage counted and its
-- would-be refusals counted, but its own budget refuses nothing.
ALTER TABLE agents ADD COLUMN enforce BIGINT NOT NULL DEFAULT 1;
