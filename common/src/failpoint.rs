//! Fault injection for the crash tests: `HOMECELL_FAILPOINTS=a,b` makes the
//! process abort (as `kill -9` would: no unwinding, no cleanup) when it
//! reaches a named point; `a=500` instead pauses there for 500 ms (to hold
//! a window open, such as a move's between its copy and its cut-over).
//! Unset, as in production, a point costs one branch on a value read once.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// Armed points: name → None to abort, Some(pause) to wait.
fn armed() -> &'static HashMap<String, Option<Duration>> {
    static ARMED: OnceLock<HashMap<String, Option<Duration>>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("HOMECELL_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once('=') {
                Some((name, ms)) => (
                    name.to_string(),
                    Some(Duration::from_millis(ms.parse().unwrap_or(0))),
                ),
                None => (s.to_string(), None),
            })
            .collect()
    })
}

/// Aborts the process if `name` is armed.
pub fn hit(name: &str) {
    if matches!(armed().get(name), Some(None)) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
}

/// Pauses at `name` if it is armed with a duration.
pub async fn pause(name: &str) {
    if let Some(Some(d)) = armed().get(name) {
        tokio::time::sleep(*d).await;
    }
}
