-- E-mail uniqueness by a key computed in the application (shared_kernel.contracts.identity.email_key),
-- not by Postgres' lower(): under the C locale lower() folds only ASCII, so 'Àda@x' and
-- 'àda@x' could both register while the read side treats them as one address.

ALTER TABLE users ADD COLUMN email_key text;
-- Rows written before this migration: lower() is what uniqueness meant for them.
UPDATE users SET email_key = lower(email);
ALTER TABLE users ALTER COLUMN email_key SET NOT NULL;
CREATE UNIQUE INDEX users_email_key_key ON users (email_key);
DROP INDEX users_email_lower_key;
