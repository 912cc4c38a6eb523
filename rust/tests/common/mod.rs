//! What integration tests share: the root check of tests that need it.
//!
//! Such a test is `#[ignore = "needs root: ..."]`, so `cargo test` reports
//! it as ignored; `cargo test -- --include-ignored` (what `.ci/run` runs, as
//! root) runs it, and then a missing privilege fails it instead of letting
//! it pass without running.

/// Whether this process holds CAP_NET_ADMIN (namespaces, TAP devices).
pub fn has_net_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// Fails the test unless it runs with CAP_NET_ADMIN.
pub fn require_net_admin() {
    assert!(
        has_net_admin(),
        "needs root (CAP_NET_ADMIN): run as root, or leave out --include-ignored"
    );
}
