-- Secrets of this deployment, made once: page tokens are signed with
-- `page_token`, so a client cannot make one.
CREATE TABLE deployment_secrets (
    name   TEXT PRIMARY KEY NOT NULL,
    secret BLOB NOT NULL CHECK (length(secret) = 32)
);
