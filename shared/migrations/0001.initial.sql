-- Campaigns, channels, filters, poller checkpoints, claim-check blobs,
-- quarantine and the idempotency records of router and sender.

CREATE TABLE campaigns (
    id          bigserial PRIMARY KEY,
    key         text NOT NULL UNIQUE CHECK (key ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE channels (
    id                   bigserial PRIMARY KEY,
    name                 text NOT NULL UNIQUE CHECK (length(btrim(name)) > 0),
    address              text NOT NULL DEFAULT '',
    default_campaign_id  bigint REFERENCES campaigns (id) ON DELETE RESTRICT,
    active               boolean NOT NULL DEFAULT false,
    inbound_type         text CHECK (inbound_type IN ('imap', 'pop3', 'graph')),
    inbound              jsonb NOT NULL DEFAULT '{}',
    outbound_type        text CHECK (outbound_type IN ('smtp', 'graph')),
    outbound             jsonb NOT NULL DEFAULT '{}',
    -- Passwords, client secrets and tokens: one Fernet token of a JSON object.
    secrets              bytea,
    sync_all_folders     boolean NOT NULL DEFAULT false,
    sync_recipient_only  boolean NOT NULL DEFAULT false,
    last_validated_at    timestamptz,
    validation           jsonb,
    last_poll_at         timestamptz,
    last_poll_ok_at      timestamptz,
    last_poll_error      text,
    consecutive_failures integer NOT NULL DEFAULT 0,
    lease_owner          text,
    lease_expires_at     timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT active_needs_default_campaign
        CHECK (NOT active OR default_campaign_id IS NOT NULL)
);

CREATE TABLE filters (
    id           bigserial PRIMARY KEY,
    channel_id   bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    position     integer NOT NULL,
    field        text NOT NULL CHECK (field IN ('sender', 'subject', 'body')),
    operator     text NOT NULL DEFAULT 'contains'
                 CHECK (operator IN ('contains', 'not_contains', 'regex')),
    value        text NOT NULL CHECK (length(value) > 0),
    campaign_id  bigint NOT NULL REFERENCES campaigns (id) ON DELETE RESTRICT,
    stop         boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT filter_position_unique UNIQUE (channel_id, position)
        DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE mailbox_checkpoints (
    channel_id   bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    folder       text NOT NULL,
    uidvalidity  bigint NOT NULL,
    last_uid     bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, folder)
);

CREATE TABLE blobs (
    sha256      text PRIMARY KEY,
    size        bigint NOT NULL,
    data        bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE quarantine (
    id           bigserial PRIMARY KEY,
    stage        text NOT NULL CHECK (stage IN ('poller', 'router', 'sender')),
    channel_id   bigint,
    reason       text NOT NULL,
    detail       text NOT NULL DEFAULT '',
    queue        text NOT NULL DEFAULT '',
    body         bytea NOT NULL,
    raw_sha256   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    replayed_at  timestamptz
);
CREATE INDEX quarantine_open ON quarantine (created_at) WHERE replayed_at IS NULL;

CREATE TABLE routed_messages (
    channel_id   bigint NOT NULL,
    raw_sha256   text NOT NULL,
    routed_id    uuid NOT NULL,
    campaign_id  bigint NOT NULL,
    source_key   text NOT NULL,
    state        text NOT NULL CHECK (state IN ('pending', 'published')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, raw_sha256)
);

CREATE TABLE outbound_deliveries (
    idempotency_key  text PRIMARY KEY,
    channel_id       bigint NOT NULL,
    message_id       text NOT NULL,
    state            text NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    smtp_code        integer,
    detail           text NOT NULL DEFAULT '',
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Deliveries of one broker message seen again after a worker stopped
-- mid-batch; past the delivery limit the message is quarantined.
CREATE TABLE delivery_attempts (
    queue       text NOT NULL,
    message_id  text NOT NULL,
    attempts    integer NOT NULL DEFAULT 1,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, message_id)
);

-- Messages the poller decided not to publish (over the size limit, or not
-- addressed to the channel when it syncs only its own mail). POP3 has no
-- checkpoint, so this keeps such a message from being judged at every poll.
CREATE TABLE skipped_messages (
    channel_id  bigint NOT NULL REFERENCES channels (id) ON DELETE CASCADE,
    source_key  text NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel_id, source_key)
);

-- Pollers alive now: each writes its heartbeat every loop, and the channels
-- are shared out evenly among those seen within one lease period.
CREATE TABLE pollers (
    owner         text PRIMARY KEY,
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);
