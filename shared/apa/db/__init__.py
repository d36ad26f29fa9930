"""The registry database: SQLAlchemy models (`models`), engines and migrations (`session`), the
hash-chained audit trail (`audit`), the state transitions (`registry`), model import
(`bootstrap`) and the `apa db` / `apa erase` commands (`cli`)."""
