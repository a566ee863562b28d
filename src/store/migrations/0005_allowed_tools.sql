-- Runs with tools (issue #14): the token policy field bounding a run's `tools`. NULL: any
-- (a run naming none gets the built-in set).
ALTER TABLE tokens ADD COLUMN allowed_tools TEXT;  -- JSON: "none", "default" or [names]
