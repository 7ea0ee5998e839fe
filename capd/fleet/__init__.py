"""A fleet: several capd nodes on one PostgreSQL database (docs/scaling.md). The node's
membership is `capd.fleet.membership.Fleet`; the package imports nothing by itself, so a
capd on SQLite loads no PostgreSQL driver."""
