//! The cell's clock: milliseconds since the Unix epoch, as every table
//! stores them.
//!
//! Injectable for tests without threading a clock through every service:
//! `at(ms, future)` runs a future with the time fixed, in a task local, so
//! a test can stand at an expiry's edge and step past it. Outside such a
//! future (always, in production) it is the system's time.

use std::future::Future;

tokio::task_local! {
    static FIXED: i64;
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    FIXED.try_with(|ms| *ms).unwrap_or_else(|_| system_ms())
}

/// Runs `f` with `now_ms()` answering `ms`.
pub async fn at<F: Future>(ms: i64, f: F) -> F::Output {
    FIXED.scope(ms, f).await
}

fn system_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fixed_time_holds_only_inside_its_future() {
        let real = now_ms();
        assert!(real > 1_700_000_000_000);
        assert_eq!(at(42, async { now_ms() }).await, 42);
        assert_eq!(at(7, async { at(8, async { now_ms() }).await }).await, 8);
        assert!(now_ms() >= real);
    }
}
