-- Mixed-version meshes (issue 11): the mesh manifest formats a data plane declared it runs
-- (null: it declared none, a data plane from before the declaration: format 1 only).
ALTER TABLE dataplanes ADD COLUMN pieces_formats jsonb;
