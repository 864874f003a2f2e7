-- Administrators' API tokens, and the console sessions opened with them.
-- depends: 0001.initial

CREATE TABLE api_tokens (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,62}$'),
    role          text NOT NULL CHECK (role IN ('read-only', 'admin')),
    -- SHA-256 of the token. Tokens carry 256 random bits, so there is no
    -- dictionary to try and a slow password hash would add nothing.
    token_hash    text NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz
);

CREATE TABLE console_sessions (
    -- SHA-256 of the cookie's value, so a copy of the table opens no session.
    session_hash  text PRIMARY KEY,
    token_id      bigint NOT NULL REFERENCES api_tokens (id) ON DELETE CASCADE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
