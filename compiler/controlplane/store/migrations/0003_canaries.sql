-- Canaries (issue 16): each Canary's state (step, weight, phase, counters, history), so that a
-- control plane that restarts, or a replica that takes the lead, resumes it at the same step.
CREATE TABLE canaries (
    key text PRIMARY KEY,
    state jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
