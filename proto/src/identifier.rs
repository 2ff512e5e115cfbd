//! Login identifiers: an E.164 phone, an email, or a username, each
//! validated and normalised so the same person cannot register twice by
//! changing case or punctuation.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Phone,
    Email,
    Username,
}

impl Kind {
    /// The kind a stored `kind` column names.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Phone, Self::Email, Self::Username]
            .into_iter()
            .find(|k| k.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Phone => "phone",
            Self::Email => "email",
            Self::Username => "username",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    pub kind: Kind,
    pub value: String,
}

impl Identifier {
    /// `kind:value`, the form the directory hashes.
    pub fn qualified(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.value)
    }

    pub fn parse(input: &str) -> Result<Self, &'static str> {
        let s = input.trim();
        if s.is_empty() {
            return Err("an identifier is required");
        }
        if s.len() > 320 {
            return Err("the identifier is too long");
        }
        if s.starts_with('+') {
            return normalise_phone(s).map(|value| Self {
                kind: Kind::Phone,
                value,
            });
        }
        if s.contains('@') {
            return normalise_email(s).map(|value| Self {
                kind: Kind::Email,
                value,
            });
        }
        normalise_username(s).map(|value| Self {
            kind: Kind::Username,
            value,
        })
    }
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.qualified())
    }
}

/// E.164: `+`, a non-zero country digit, 7 to 15 digits in all. Spaces,
/// dashes, dots and parentheses are dropped.
fn normalise_phone(s: &str) -> Result<String, &'static str> {
    let digits: String = s[1..]
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')'))
        .collect();
    let ok = (7..=15).contains(&digits.len())
        && digits.chars().all(|c| c.is_ascii_digit())
        && !digits.starts_with('0');
    if ok {
        Ok(format!("+{digits}"))
    } else {
        Err("a phone number must be in E.164 form, e.g. +8613800000000")
    }
}

/// Lower-cased; one `@`; a dotted domain; no spaces or control characters.
fn normalise_email(s: &str) -> Result<String, &'static str> {
    let e = s.to_lowercase();
    let bad = "not a valid email address";
    let (local, domain) = e.split_once('@').ok_or(bad)?;
    let chars_ok = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| {
                !c.is_whitespace()
                    && !c.is_control()
                    && c != '@'
                    && c != '<'
                    && c != '>'
                    && c != '"'
                    && c != '\\'
            })
    };
    let domain_ok = domain.len() <= 253
        && domain.contains('.')
        && domain.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        });
    if e.len() <= 254 && local.len() <= 64 && chars_ok(local) && domain_ok {
        Ok(e)
    } else {
        Err(bad)
    }
}

/// 3 to 32 of `[a-z0-9_.-]`, starting with a letter; lower-cased.
fn normalise_username(s: &str) -> Result<String, &'static str> {
    let u = s.to_ascii_lowercase();
    let ok = (3..=32).contains(&u.len())
        && u.starts_with(|c: char| c.is_ascii_lowercase())
        && u.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(u)
    } else {
        Err("a username is 3-32 characters of a-z, 0-9, _ . -, starting with a letter")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        let p = Identifier::parse(" +86 138-0000-0000 ").unwrap();
        assert_eq!(p.qualified(), "phone:+8613800000000");
        let e = Identifier::parse("Alice@Example.COM").unwrap();
        assert_eq!(e.qualified(), "email:alice@example.com");
        let u = Identifier::parse("Alice_1").unwrap();
        assert_eq!(u.qualified(), "username:alice_1");
    }

    #[test]
    fn refuses_malformed_and_hostile() {
        for bad in [
            "",
            "+0123",
            "+12",
            "+12345678901234567",
            "+86abc",
            "a@b",
            "@b.com",
            "a@@b.com",
            "a b@c.com",
            "x",
            "1abc",
            "robert'); DROP TABLE users;--",
            "<script>@x.com",
            "a@-b.com",
        ] {
            assert!(Identifier::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
