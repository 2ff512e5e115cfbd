//! Templates: text with `{{variable}}` placeholders. A template is parsed
//! when it is saved (a malformed one is refused) and rendered with the
//! event's variables; a missing variable is an error, never an empty
//! string. For HTML email every variable is escaped.

use serde_json::{Map, Value};

#[derive(Debug, PartialEq, Eq)]
enum Part<'a> {
    Text(&'a str),
    Var(&'a str),
}

fn parse(t: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| "an unclosed {{ placeholder".to_string())?;
        let name = after[..close].trim();
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(format!(
                "{{{{{name}}}}} is not a variable name (a-z, 0-9, _)"
            ));
        }
        parts.push(Part::Var(name));
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return Err("a stray }} outside a placeholder".into());
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

/// Checks a template's syntax; the variables it uses.
pub fn check(t: &str) -> Result<Vec<String>, String> {
    Ok(parse(t)?
        .into_iter()
        .filter_map(|p| match p {
            Part::Var(v) => Some(v.to_string()),
            Part::Text(_) => None,
        })
        .collect())
}

pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Renders `t`; `html` escapes the text and the variables for an HTML body
/// (and turns line breaks into `<br>`).
pub fn render(t: &str, vars: &Map<String, Value>, html: bool) -> Result<String, String> {
    let mut out = String::with_capacity(t.len() + 32);
    for part in parse(t)? {
        let piece = match part {
            Part::Text(s) => s.to_string(),
            Part::Var(name) => match vars.get(name) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(_) => return Err(format!("variable {name} is not text or a number")),
                None => return Err(format!("variable {name} is missing")),
            },
        };
        if html {
            out.push_str(&escape_html(&piece).replace('\n', "<br>"));
        } else {
            out.push_str(&piece);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn renders_and_refuses() {
        let v = vars(json!({"code": "123456", "n": 5}));
        assert_eq!(
            render("Code {{code}} ({{ n }})", &v, false).unwrap(),
            "Code 123456 (5)"
        );
        assert_eq!(
            render("Hi {{name}}", &v, false).unwrap_err(),
            "variable name is missing"
        );
        assert!(render("Hi {{name", &v, false).is_err());
        assert!(render("Hi }} there", &v, false).is_err());
        assert!(render("{{Bad-Name}}", &v, false).is_err());
        assert!(render("{{o}}", &vars(json!({"o": {"a": 1}})), false).is_err());
        assert_eq!(check("{{a}} and {{b}}").unwrap(), vec!["a", "b"]);
    }

    #[test]
    fn html_escapes_hostile_variables() {
        let v = vars(json!({"name": "<script>alert('x')</script> & \"co\""}));
        let out = render("<b>not markup</b>\nHi {{name}}", &v, true).unwrap();
        assert_eq!(
            out,
            "&lt;b&gt;not markup&lt;/b&gt;<br>Hi &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;co&quot;"
        );
        assert!(!out.contains('<') || out.contains("<br>"));
    }
}
