//! Retry delays: exponential from `base_ms`, capped at `max_ms`, with "equal
//! jitter" (half fixed, half random) so that retries after a shared outage
//! spread out instead of arriving together.

pub fn jittered_ms(attempts: i64, base_ms: i64, max_ms: i64) -> i64 {
    let exp = base_ms
        .saturating_mul(1i64 << attempts.clamp(0, 30))
        .clamp(2, max_ms.max(2));
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    exp / 2 + i64::from(u32::from_le_bytes(b)) % (exp / 2 + 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn grows_and_stays_within_bounds() {
        for attempts in 0..40 {
            let exp = (200i64 << attempts.min(30)).min(10_000);
            let d = super::jittered_ms(attempts, 200, 10_000);
            assert!((exp / 2..=exp).contains(&d), "{attempts}: {d}");
        }
    }
}
