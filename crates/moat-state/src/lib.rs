//! moat's state store: allocations, ownership of host resources, operation journal, apply lock (SQLite)
