-- meshc control plane state on PostgreSQL (compiler/controlplane/store/postgres.py).
-- Applied once, in one transaction, recorded in schema_version. Never edit a released migration:
-- add 0002_*.sql instead.

CREATE TABLE replicas (
    id          text PRIMARY KEY,
    url         text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- One row per singleton job. The fencing token grows by one on every change of holder; a write
-- on behalf of the leader names its token and is refused unless the row still holds it.
CREATE TABLE leader_lock (
    name        text PRIMARY KEY,
    holder      text,
    token       bigint NOT NULL DEFAULT 0,
    acquired_at timestamptz,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity'
);
INSERT INTO leader_lock (name) VALUES ('controlplane');

-- Registrations, heartbeats and online state; replica = the control plane the data plane talks to.
CREATE TABLE dataplanes (
    instance        text PRIMARY KEY,
    mesh            text NOT NULL,
    service         text NOT NULL,
    kind            text NOT NULL,
    tags            jsonb NOT NULL,
    inbound_address text,
    admin_address   text NOT NULL,
    boot_id         text,
    registered_at   double precision NOT NULL,
    last_seen       double precision NOT NULL,
    online          boolean NOT NULL,
    replica         text NOT NULL,
    running         jsonb NOT NULL DEFAULT '{}',
    generations     jsonb NOT NULL DEFAULT '{}'
);

-- Per data plane, per slot (endpoints|mesh|service): what was sent, acknowledged, refused.
CREATE TABLE sync_state (
    instance    text NOT NULL,
    slot        text NOT NULL,
    state       jsonb NOT NULL,
    replica     text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance, slot)
);

-- Push generations: every replica reserves a block above every block reserved before.
CREATE TABLE generation (
    id    integer PRIMARY KEY CHECK (id = 1),
    high  bigint NOT NULL
);
INSERT INTO generation VALUES (1, 0);

-- Content-addressed bundles and the releases that name them (written by the leader).
CREATE TABLE bundles (
    digest  text PRIMARY KEY,
    data    bytea NOT NULL
);
CREATE TABLE releases (
    id            text PRIMARY KEY,
    commit        text,
    record        jsonb NOT NULL,
    digests       jsonb NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE release_pointer (
    id             integer PRIMARY KEY CHECK (id = 1),
    release_id     text REFERENCES releases (id),
    fencing_token  bigint NOT NULL DEFAULT 0,
    holder         text,
    seen_at        double precision,
    updated_at     timestamptz
);
INSERT INTO release_pointer (id) VALUES (1);

-- CA and token metadata. Never a private key or a secret: those stay in the secrets dir.
CREATE TABLE security_meta (
    key         text PRIMARY KEY,
    value       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE ca_certs (
    mesh         text PRIMARY KEY,
    cert_pem     text NOT NULL,
    fingerprint  text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
