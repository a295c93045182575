-- Per-service endpoint sets (issue 11): whether a data plane takes its endpoints scoped and as
-- deltas, as it registered. Without it a control plane restarted on this store pushed the
-- data planes it restored the whole mesh's set until they registered again, which they do not.
ALTER TABLE dataplanes ADD COLUMN endpoint_deltas boolean NOT NULL DEFAULT false;
