//! W3C Trace Context (`traceparent`), carried router → cell → cell.
//!
//! Each hop keeps the caller's trace id and flags and names itself the
//! parent with a fresh span id; a missing or malformed header starts a new
//! trace (the spec's rule for a receiver that cannot parse it). Only
//! version 00 is produced; a future version is read by its first four
//! fields, as the spec asks.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

tokio::task_local! {
    /// The trace of the request this task serves, for outgoing calls.
    pub static CURRENT: TraceParent;
}

impl TraceParent {
    /// Parses a `traceparent` header value; None when it is not valid.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        let rest = parts.next();
        if version.len() != 2 || !lower_hex(version) || version == "ff" {
            return None;
        }
        // Version 00 has exactly four fields; later versions may add more.
        if version == "00" && rest.is_some() {
            return None;
        }
        if flags.len() != 2 || !lower_hex(flags) {
            return None;
        }
        let trace_id: [u8; 16] = decode(trace)?;
        let span_id: [u8; 8] = decode(span)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: u8::from_str_radix(flags, 16).ok()?,
        })
    }

    /// A new trace, sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: random_nonzero(),
            span_id: random_nonzero(),
            flags: 0x01,
        }
    }

    /// This hop's context: the same trace, a new span id.
    pub fn child(&self) -> Self {
        Self {
            span_id: random_nonzero(),
            ..*self
        }
    }

    /// The caller's context (its parsed `traceparent`) as this hop's, or a
    /// new trace when there is none (or it was malformed).
    pub fn continue_from(caller: Option<Self>) -> Self {
        caller.map_or_else(Self::new_root, |t| t.child())
    }

    pub fn trace_id_hex(&self) -> String {
        crate::hex::encode(&self.trace_id)
    }
}

impl TraceParent {
    /// The `traceparent` header value: `00-<trace id>-<span id>-<flags>`.
    pub fn header_value(&self) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        crate::hex::push(&mut out, &self.trace_id);
        out.push('-');
        crate::hex::push(&mut out, &self.span_id);
        out.push('-');
        crate::hex::push(&mut out, &[self.flags]);
        out
    }
}

/// The `traceparent` of the request this task serves, if it serves one:
/// what an event it causes keeps, for a later span to link to.
pub fn current_header() -> Option<String> {
    CURRENT.try_with(TraceParent::header_value).ok()
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.header_value())
    }
}

fn lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !lower_hex(s) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// From the thread-local CSPRNG (seeded by the OS): a getrandom syscall for
/// every id cost the router measurably per request.
fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let b: [u8; N] = rand::random();
        // A zero id is invalid.
        if b != [0; N] {
            return b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_spec_example() {
        let t = TraceParent::parse(GOOD).expect("valid");
        assert_eq!(t.to_string(), GOOD);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.flags, 1);
    }

    #[test]
    fn refuses_malformed_values() {
        for bad in [
            "",
            "00",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0\u{e9}",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad:?}");
        }
        // A later version may carry more fields; its first four are read.
        assert!(
            TraceParent::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xyz")
                .is_some()
        );
    }

    #[test]
    fn a_hop_keeps_the_trace_and_takes_a_new_span() {
        let caller = TraceParent::parse(GOOD).expect("valid");
        let hop = TraceParent::continue_from(TraceParent::parse(GOOD));
        assert_eq!(hop.trace_id, caller.trace_id);
        assert_eq!(hop.flags, caller.flags);
        assert_ne!(hop.span_id, caller.span_id);
        let fresh = TraceParent::continue_from(TraceParent::parse("garbage"));
        assert_ne!(fresh.trace_id, caller.trace_id);
        assert!(TraceParent::parse(&fresh.to_string()).is_some());
    }
}
