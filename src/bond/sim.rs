//! Deterministic network simulator for the bond core (virtual time, seeded).
