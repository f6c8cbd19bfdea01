-- The catalog, orders and the persisted state of order sagas.

CREATE TABLE products (
    id                  uuid        PRIMARY KEY,
    sku                 text        NOT NULL,
    name                text        NOT NULL,
    currency_code       char(3)     NOT NULL,
    price_minor         bigint      NOT NULL CHECK (price_minor >= 0),
    -- Units available for sale. Reserved units are already subtracted, so this can
    -- never go negative: the CHECK is the last line of defence under any race.
    stock_available     bigint      NOT NULL CHECK (stock_available >= 0),
    discontinued        boolean     NOT NULL DEFAULT false,
    discontinued_reason text        NOT NULL DEFAULT '',
    version             bigint      NOT NULL CHECK (version > 0),
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
CREATE UNIQUE INDEX products_sku_lower_key ON products (lower(sku));

CREATE TABLE orders (
    id               uuid        PRIMARY KEY,
    customer_id      uuid        NOT NULL REFERENCES users (id),
    status           text        NOT NULL CHECK (status IN
                         ('pending', 'reserved', 'confirmed', 'shipped', 'cancelled', 'rejected')),
    currency_code    char(3)     NOT NULL,
    total_minor      bigint      NOT NULL CHECK (total_minor >= 0),
    shipping_address jsonb       NOT NULL,
    notes            text        NOT NULL DEFAULT '',
    reason           text        NOT NULL DEFAULT '',
    cancelled_by     text        NOT NULL DEFAULT '',
    carrier          text        NOT NULL DEFAULT '',
    tracking_number  text        NOT NULL DEFAULT '',
    version          bigint      NOT NULL CHECK (version > 0),
    placed_at        timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL
);
CREATE INDEX orders_customer_idx ON orders (customer_id, placed_at DESC);

CREATE TABLE order_lines (
    order_id         uuid   NOT NULL REFERENCES orders (id),
    line_no          int    NOT NULL CHECK (line_no > 0),
    product_id       uuid   NOT NULL REFERENCES products (id),
    sku              text   NOT NULL,
    product_name     text   NOT NULL,
    unit_price_minor bigint NOT NULL CHECK (unit_price_minor >= 0),
    quantity         bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, line_no),
    UNIQUE (order_id, product_id)
);

-- Units of a product held for an order. A row is written when the saga reserves and
-- stamped when it releases, so releasing twice returns nothing twice.
CREATE TABLE stock_reservations (
    order_id    uuid        NOT NULL REFERENCES orders (id),
    product_id  uuid        NOT NULL REFERENCES products (id),
    quantity    bigint      NOT NULL CHECK (quantity > 0),
    reserved_at timestamptz NOT NULL,
    released_at timestamptz,
    PRIMARY KEY (order_id, product_id)
);

-- One row per saga execution: where it stands, what it knows, when it may run next,
-- and which worker holds it (a lease that expires, so a dead worker's sagas resume).
CREATE TABLE saga_executions (
    id              uuid        PRIMARY KEY,
    saga_type       text        NOT NULL,
    order_id        uuid        NOT NULL UNIQUE REFERENCES orders (id),
    status          text        NOT NULL CHECK (status IN ('running', 'compensating', 'completed', 'failed')),
    current_step    text        NOT NULL,
    context         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    version         bigint      NOT NULL CHECK (version > 0),
    attempts        int         NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error      text        NOT NULL DEFAULT '',
    next_attempt_at timestamptz,
    locked_by       text,
    locked_until    timestamptz,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
-- The worker's queue: sagas with work to do, by when it is due.
CREATE INDEX saga_executions_due_idx ON saga_executions (next_attempt_at)
    WHERE status IN ('running', 'compensating');
CREATE INDEX saga_executions_status_idx ON saga_executions (status, created_at DESC);

-- The step log: every attempt of every step, forward or compensating, with its outcome.
CREATE TABLE saga_steps (
    id       bigserial   PRIMARY KEY,
    saga_id  uuid        NOT NULL REFERENCES saga_executions (id),
    step     text        NOT NULL,
    kind     text        NOT NULL CHECK (kind IN ('act', 'compensate')),
    outcome  text        NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'retrying')),
    detail   text        NOT NULL DEFAULT '',
    attempt  int         NOT NULL CHECK (attempt > 0),
    at       timestamptz NOT NULL
);
CREATE INDEX saga_steps_saga_idx ON saga_steps (saga_id, id);

-- Wake saga workers as soon as a saga has new work; they also poll as a fallback.
CREATE FUNCTION saga_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('saga_due', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER saga_notify_after_write
    AFTER INSERT OR UPDATE OF status, next_attempt_at ON saga_executions
    FOR EACH STATEMENT EXECUTE FUNCTION saga_notify();
