"""The fleet's tables, appended to the PostgreSQL store's migrations (capd.store.postgres).

`nodes`: one row per node name; `incarnation` is the fencing token of the process that
runs under that name now (0: ended, its pods are up for adoption) and `expires` its lease,
in the database's clock only. `leases`: which node hosts each pod, `epoch` +1 at every
change of holder. `capd_fence` runs right before every batch's COMMIT, in the same
transaction: it renews the node's lease and raises SQLSTATE CF001 when this process no
longer holds it, which turns that COMMIT into a rollback (docs/scaling.md; fleet22 §3).
"""

FENCE_SQLSTATE = "CF001"
"""What `capd_fence` raises when the calling process lost its node lease."""

FLEET_MIGRATION = """
CREATE SEQUENCE node_incarnation;
CREATE TABLE nodes (
    name        TEXT PRIMARY KEY,
    incarnation BIGINT NOT NULL,
    address     TEXT,
    started     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    expires     TIMESTAMPTZ NOT NULL,
    draining    BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE leases (
    pod    TEXT PRIMARY KEY REFERENCES pods (name) ON DELETE CASCADE,
    node   TEXT NOT NULL REFERENCES nodes (name),
    epoch  BIGINT NOT NULL,
    family TEXT NOT NULL
);
CREATE INDEX leases_node ON leases (node, family);
ALTER TABLE outbox ADD COLUMN target_pod TEXT;
CREATE INDEX outbox_target_pod ON outbox (target_pod, id) WHERE target_pod IS NOT NULL;

CREATE FUNCTION capd_fence(me TEXT, inc BIGINT, ttl_s DOUBLE PRECISION) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE nodes SET expires = clock_timestamp() + make_interval(secs => ttl_s)
    WHERE name = me AND incarnation = inc AND expires > clock_timestamp();
    IF NOT FOUND THEN
        RAISE EXCEPTION 'capd: node % (incarnation %) lost its lease', me, inc
            USING ERRCODE = 'CF001';
    END IF;
END $$;
"""


class LeaseLost(Exception):
    """A batch's fence found that this process no longer holds its node's lease: the
    batch rolled back, and capd stops as for any failed commit."""
