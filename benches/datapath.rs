//! Criterion benchmark of the per-packet path (placeholder until the core lands).
fn main() {}
