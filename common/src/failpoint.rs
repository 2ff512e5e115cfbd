//! Fault injection for the crash tests: `HOMECELL_FAILPOINTS=a,b` makes the
//! process abort (as `kill -9` would: no unwinding, no cleanup) when it
//! reaches a named point. Unset, as in production, a point costs one
//! branch on a value read once.

use std::collections::HashSet;
use std::sync::OnceLock;

fn armed() -> &'static HashSet<String> {
    static ARMED: OnceLock<HashSet<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("HOMECELL_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    })
}

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    if armed().contains(name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}
