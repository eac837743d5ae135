//! The shared engine: PostgreSQL (see the module docs of `super`).
