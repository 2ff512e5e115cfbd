//! Layered configuration: a TOML file, then environment overrides, then the
//! component's own `validate()`. The environment is passed in (not read from
//! the process) so tests never mutate global state.
//!
//! An override is `PREFIX` + the field path upper-cased, nested with `__`:
//! with prefix `HOMECELL_`, `HOMECELL_ADMIN_LISTEN` sets `admin_listen` and
//! `HOMECELL_TLS__CA` sets `tls.ca`. Values that read as TOML integers, floats,
//! booleans or arrays take that type; anything else is a string (quote it to
//! force a string: `HOMECELL_X='"123"'`).

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use std::path::Path;

/// Loads `T` from an optional TOML file and the given environment.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    prefix: &str,
) -> Result<T> {
    let mut table = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            text.parse::<toml::Table>()
                .with_context(|| format!("config file {} is not valid TOML", path.display()))?
        }
        None => toml::Table::new(),
    };
    for (name, value) in env {
        let Some(path) = name.strip_prefix(prefix) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(|k| k.is_empty()) {
            bail!("environment variable {name} does not name a config field");
        }
        set_path(&mut table, &keys, env_value(&value))
            .with_context(|| format!("environment variable {name}"))?;
    }
    let what = file.map_or_else(|| "configuration".to_string(), |p| p.display().to_string());
    T::deserialize(toml::Value::Table(table)).with_context(|| format!("invalid {what}"))
}

fn env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_)
                | toml::Value::Array(_)
                | toml::Value::String(_)),
            ) => v,
            _ => toml::Value::String(raw.to_string()),
        },
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<()> {
    let (last, parents) = keys.split_last().expect("at least one key");
    let mut cur = table;
    for k in parents {
        let entry = cur
            .entry(k.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry
            .as_table_mut()
            .with_context(|| format!("{k} is not a table"))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// The process environment, for `load`.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        listen: String,
        threads: u32,
        tls: Tls,
    }
    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Tls {
        ca: String,
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "listen = \"a:1\"\nthreads = 1\n[tls]\nca = \"x\"\n").unwrap();
        let c: Conf = load(
            Some(&f),
            env(&[("HC_THREADS", "4"), ("HC_TLS__CA", "/y"), ("OTHER", "1")]),
            "HC_",
        )
        .unwrap();
        assert_eq!(
            (c.listen.as_str(), c.threads, c.tls.ca.as_str()),
            ("a:1", 4, "/y")
        );
    }

    #[test]
    fn unknown_and_mistyped_fields_are_errors() {
        let e = load::<Conf>(None, env(&[("HC_LISTEN", "a"), ("HC_THREADS", "x")]), "HC_");
        assert!(e.is_err());
        let e = load::<Conf>(
            None,
            env(&[
                ("HC_LISTEN", "a"),
                ("HC_THREADS", "1"),
                ("HC_TLS__CA", "c"),
                ("HC_NOPE", "1"),
            ]),
            "HC_",
        );
        let msg = format!("{:#}", e.unwrap_err());
        assert!(msg.contains("nope"), "{msg}");
    }
}
