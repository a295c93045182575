-- Delta pushes (issue 11): whether a data plane takes its mesh slot as a manifest and pieces, and
-- the services it declared it reaches (Kuma's reachableServices), as it registered.
ALTER TABLE dataplanes ADD COLUMN pieces boolean NOT NULL DEFAULT false;
ALTER TABLE dataplanes ADD COLUMN reachable jsonb;
