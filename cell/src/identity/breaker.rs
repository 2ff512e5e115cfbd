//! Fails claims fast while the control plane is unreachable.
//!
//! A claim that cannot reach the control plane waits out its 5 s deadline
//! (a cut-off network drops packets rather than refusing them). Without
//! this, every registration during an outage would hang those 5 s and hold
//! a password-hash slot meanwhile. After one such failure the breaker
//! opens: claims fail at once with 503 and `Retry-After` for
//! [`OPEN_FOR`], then a single claim at a time probes, and the first that
//! gets through closes it again. A probe that never reports (its caller
//! hung up, or failed before the call) is given up after [`PROBE_FOR`], so
//! no dropped request can leave the breaker refusing for good.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long claims fail fast after the control plane was not reached.
pub const OPEN_FOR: Duration = Duration::from_secs(5);
/// How long a probe may take before another may start: past the claim's
/// own 5 s deadline.
pub const PROBE_FOR: Duration = Duration::from_secs(6);

#[derive(Default)]
pub struct Breaker {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Set while open: claims before this instant fail fast.
    open_until: Option<Instant>,
    /// A probe in flight since then (half-open): the others fail fast.
    probing: Option<Instant>,
}

/// What a caller may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Permit {
    /// Go ahead (closed, or the probe of a half-open breaker).
    Go,
    /// Fail fast; retry after this many seconds.
    Refuse(u64),
}

impl Breaker {
    pub fn permit(&self) -> Permit {
        self.permit_at(Instant::now())
    }

    fn permit_at(&self, now: Instant) -> Permit {
        let mut s = self.state.lock().expect("poisoned");
        match s.open_until {
            None => Permit::Go,
            Some(until) if now < until => Permit::Refuse(secs(until - now)),
            Some(_) if s.probing.is_some_and(|p| now < p + PROBE_FOR) => {
                Permit::Refuse(secs(OPEN_FOR))
            }
            Some(_) => {
                s.probing = Some(now);
                Permit::Go
            }
        }
    }

    /// Whether a claim now would be refused, without taking the probe: a
    /// registration asks before it spends a password hash.
    pub fn refusing(&self) -> Option<u64> {
        let s = self.state.lock().expect("poisoned");
        let now = Instant::now();
        match s.open_until {
            Some(until) if now < until => Some(secs(until - now)),
            Some(_) if s.probing.is_some_and(|p| now < p + PROBE_FOR) => Some(secs(OPEN_FOR)),
            _ => None,
        }
    }

    /// The control plane answered (whatever it said).
    pub fn reached(&self) {
        *self.state.lock().expect("poisoned") = State::default();
    }

    /// The control plane was not reached (a timeout, a transport error).
    pub fn missed(&self) {
        self.missed_at(Instant::now());
    }

    fn missed_at(&self, now: Instant) {
        let mut s = self.state.lock().expect("poisoned");
        s.open_until = Some(now + OPEN_FOR);
        s.probing = None;
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_on_a_miss_probes_one_at_a_time_and_closes_when_reached() {
        let b = Breaker::default();
        let t = Instant::now();
        assert_eq!(b.permit_at(t), Permit::Go);
        b.missed_at(t);
        assert_eq!(b.permit_at(t), Permit::Refuse(5));
        assert_eq!(
            b.permit_at(t + Duration::from_millis(4_500)),
            Permit::Refuse(1)
        );
        let later = t + OPEN_FOR;
        assert_eq!(b.permit_at(later), Permit::Go, "the probe");
        assert_eq!(b.permit_at(later), Permit::Refuse(5), "one probe at a time");
        b.missed_at(later);
        assert_eq!(b.permit_at(later), Permit::Refuse(5), "open again");
        b.reached();
        assert_eq!(b.permit_at(later), Permit::Go);
        assert_eq!(b.permit_at(later), Permit::Go, "closed: everyone goes");
    }

    /// A probe whose caller hung up never reports: another takes over.
    #[test]
    fn an_abandoned_probe_is_given_up() {
        let b = Breaker::default();
        let t = Instant::now();
        b.missed_at(t);
        let probe = t + OPEN_FOR;
        assert_eq!(b.permit_at(probe), Permit::Go);
        assert_eq!(
            b.permit_at(probe + Duration::from_secs(5)),
            Permit::Refuse(5)
        );
        assert_eq!(b.permit_at(probe + PROBE_FOR), Permit::Go, "a new probe");
    }
}
