//! The `baton-chaos` binary.

fn main() {}
