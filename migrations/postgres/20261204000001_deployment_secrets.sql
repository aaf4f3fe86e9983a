-- Secrets every replica of one deployment shares, made once by the first
-- replica that needs them: page tokens are signed with `page_token`, so a
-- token made by any replica is taken by every other, and a client cannot
-- make one.
CREATE TABLE deployment_secrets (
    name   text PRIMARY KEY,
    secret bytea NOT NULL CHECK (length(secret) = 32)
);
