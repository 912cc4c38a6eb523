"""dmm: sockets over several network stacks, with a Rust core (dmm._core)."""
