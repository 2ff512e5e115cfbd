//! Typed configuration values: the key grammar, the schema of keys the system
//! itself reads, and parsing from and printing to text (for the CLI).

use crate::control::{ConfigValue, config_value::Kind};
use crate::error::CodedError;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigType {
    String,
    Int,
    Bool,
    Duration,
    Json,
}

impl ConfigType {
    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Int => "int",
            Self::Bool => "bool",
            Self::Duration => "duration",
            Self::Json => "json",
        }
    }

    pub fn parse(s: &str) -> Result<Self, CodedError> {
        Ok(match s {
            "string" => Self::String,
            "int" | "integer" => Self::Int,
            "bool" | "boolean" => Self::Bool,
            "duration" => Self::Duration,
            "json" => Self::Json,
            _ => {
                return Err(CodedError::invalid(format!(
                    "type {s:?} is not one of string, int, bool, duration, json"
                )));
            }
        })
    }

    pub fn of(value: &ConfigValue) -> Option<Self> {
        Some(match value.kind.as_ref()? {
            Kind::StringValue(_) => Self::String,
            Kind::IntValue(_) => Self::Int,
            Kind::BoolValue(_) => Self::Bool,
            Kind::DurationMs(_) => Self::Duration,
            Kind::JsonValue(_) => Self::Json,
        })
    }
}

/// Keys the system reads, with the type each must have. Other keys are free
/// for operators, with whatever type is given when they are first set.
pub const KNOWN_KEYS: &[(&str, ConfigType)] = &[
    ("auth.lockout.max_failures", ConfigType::Int),
    ("auth.lockout.duration", ConfigType::Duration),
    ("auth.access_token.ttl", ConfigType::Duration),
    ("auth.reset.max_codes_per_hour", ConfigType::Int),
    ("auth.reset.max_failures_per_day", ConfigType::Int),
    ("auth.otp.ttl", ConfigType::Duration),
    ("auth.register.proof", ConfigType::Bool),
    ("auth.register.pending_ttl", ConfigType::Duration),
    ("auth.recent_sign_in", ConfigType::Duration),
    ("notice.stream.max_per_user", ConfigType::Int),
    ("router.draining.retry_after", ConfigType::Duration),
    ("router.rate_limit.per_ip", ConfigType::Int),
    ("router.rate_limit.per_user", ConfigType::Int),
    ("router.rate_limit.registrations_per_ip", ConfigType::Int),
    ("notice.outbox.max_attempts", ConfigType::Int),
    ("notice.broadcast.per_second", ConfigType::Int),
    ("move.freeze_limit", ConfigType::Duration),
];

pub fn known_type(key: &str) -> Option<ConfigType> {
    KNOWN_KEYS.iter().find(|(k, _)| *k == key).map(|(_, t)| *t)
}

/// Dot-separated segments of `[a-z0-9_-]`, at most 128 characters.
pub fn validate_key(key: &str) -> Result<(), CodedError> {
    let ok = !key.is_empty()
        && key.len() <= 128
        && key.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(CodedError::invalid(format!(
            "config key {key:?} is malformed: use dot-separated segments of [a-z0-9_-]"
        )))
    }
}

/// Parses text into a value of the given type.
pub fn parse_value(ty: ConfigType, text: &str) -> Result<ConfigValue, CodedError> {
    let bad = |why: String| {
        CodedError::invalid(format!(
            "value {text:?} is not a valid {}: {why}",
            ty.name()
        ))
    };
    let kind = match ty {
        ConfigType::String => Kind::StringValue(text.to_string()),
        ConfigType::Int => Kind::IntValue(text.trim().parse().map_err(|e| bad(format!("{e}")))?),
        ConfigType::Bool => Kind::BoolValue(match text.trim() {
            "true" => true,
            "false" => false,
            _ => return Err(bad("expected true or false".into())),
        }),
        ConfigType::Duration => {
            let d = humantime::parse_duration(text.trim()).map_err(|e| bad(format!("{e}")))?;
            Kind::DurationMs(u64::try_from(d.as_millis()).map_err(|_| bad("too long".into()))?)
        }
        ConfigType::Json => {
            let v: serde_json::Value =
                serde_json::from_str(text).map_err(|e| bad(format!("{e}")))?;
            Kind::JsonValue(v.to_string())
        }
    };
    Ok(ConfigValue { kind: Some(kind) })
}

/// Checks a value as the server receives it, and against the key's known type.
/// Returns the normalised value (compact JSON).
pub fn validate_value(key: &str, value: &ConfigValue) -> Result<ConfigValue, CodedError> {
    let ty =
        ConfigType::of(value).ok_or_else(|| CodedError::invalid("a config value is required"))?;
    if let Some(want) = known_type(key)
        && want != ty
    {
        return Err(CodedError::invalid(format!(
            "config key {key:?} takes a {} value, not a {}",
            want.name(),
            ty.name()
        )));
    }
    match value.kind.as_ref() {
        Some(Kind::JsonValue(text)) => parse_value(ConfigType::Json, text),
        Some(Kind::StringValue(s)) if s.len() > 64 * 1024 => {
            Err(CodedError::invalid("a string value is limited to 64 KiB"))
        }
        _ => Ok(value.clone()),
    }
}

/// Prints a value the way `parse_value` reads it back.
pub fn format_value(value: &ConfigValue) -> String {
    match value.kind.as_ref() {
        None => String::new(),
        Some(Kind::StringValue(s)) => s.clone(),
        Some(Kind::IntValue(i)) => i.to_string(),
        Some(Kind::BoolValue(b)) => b.to_string(),
        Some(Kind::DurationMs(ms)) => {
            humantime::format_duration(Duration::from_millis(*ms)).to_string()
        }
        Some(Kind::JsonValue(j)) => j.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_type() {
        let v = parse_value(ConfigType::Duration, "15m").unwrap();
        assert_eq!(v.kind, Some(Kind::DurationMs(900_000)));
        assert_eq!(format_value(&v), "15m");
        assert!(parse_value(ConfigType::Int, "five").is_err());
        assert!(parse_value(ConfigType::Bool, "yes").is_err());
        assert!(parse_value(ConfigType::Json, "{nope").is_err());
        let j = parse_value(ConfigType::Json, "{ \"a\" : 1 }").unwrap();
        assert_eq!(format_value(&j), "{\"a\":1}");
    }

    #[test]
    fn known_keys_keep_their_type() {
        let s = parse_value(ConfigType::String, "5").unwrap();
        assert!(validate_value("auth.lockout.max_failures", &s).is_err());
        let i = parse_value(ConfigType::Int, "5").unwrap();
        assert!(validate_value("auth.lockout.max_failures", &i).is_ok());
    }

    #[test]
    fn key_grammar() {
        validate_key("auth.lockout.max_failures").unwrap();
        for bad in ["", "A.b", "a..b", "a.", "a b"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
    }
}
