//! `proxyMetadata` of a pod's `proxy.istio.io/config` annotation: the environment istiod
//! gives that pod's istio-proxy on top of the mesh's defaults. Istio's CNI plugin reads DNS
//! capture, dual-stack and invalid-drop from that environment (through the API server);
//! the CNI runtime hands meshinit-cni only the annotations, so the pod's own part is read
//! from here.
//!
//! The annotation is a ProxyConfig in YAML (JSON being YAML too). Only `proxyMetadata` is
//! read, and only in the forms users write it: JSON, a block mapping of scalars under a
//! top-level `proxyMetadata:`, or a flow mapping on that line. A `proxyMetadata` written in
//! any other way is refused rather than guessed at, since a wrong guess would silently
//! change what the pod captures.

use std::collections::BTreeMap;

/// The annotation.
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
const KEY: &str = "proxyMetadata";

/// The pod's `proxyMetadata`, empty when the annotation has none. The error says what could
/// not be read.
pub fn proxy_metadata(config: &str) -> Result<BTreeMap<String, String>, String> {
    if !config.contains(KEY) {
        return Ok(BTreeMap::new());
    }
    let trimmed = config.trim_start();
    if trimmed.starts_with('{') {
        return from_json(trimmed);
    }
    from_block_yaml(config)
}

fn from_json(config: &str) -> Result<BTreeMap<String, String>, String> {
    let value: serde_json::Value =
        serde_json::from_str(config).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(metadata) = value.get(KEY) else {
        return Ok(BTreeMap::new());
    };
    let serde_json::Value::Object(entries) = metadata else {
        return Err(format!("{KEY} is not a mapping"));
    };
    entries
        .iter()
        .map(|(name, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(_) | serde_json::Value::Number(_) => value.to_string(),
                _ => return Err(format!("{KEY}.{name} is not a string")),
            };
            Ok((name.clone(), text))
        })
        .collect()
}

fn from_block_yaml(config: &str) -> Result<BTreeMap<String, String>, String> {
    let mut lines = config.lines().map(strip_comment);
    let mut found = None;
    for line in lines.by_ref() {
        if line.starts_with(char::is_whitespace) || line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line
            .strip_prefix(KEY)
            .and_then(|r| r.trim_start().strip_prefix(':'))
        {
            found = Some(rest.trim());
            break;
        }
    }
    let Some(inline) = found else {
        return Ok(BTreeMap::new());
    };
    if !inline.is_empty() {
        return from_flow(inline);
    }
    let mut metadata = BTreeMap::new();
    let mut indent = None;
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        let this = line.len() - line.trim_start().len();
        if this == 0 {
            break;
        }
        if *indent.get_or_insert(this) != this {
            return Err(format!(
                "{KEY} holds more than a mapping of names to values: {line:?}"
            ));
        }
        let (name, value) = entry(line.trim())?;
        metadata.insert(name, value);
    }
    Ok(metadata)
}

/// `{A: "x", B: y}` on one line.
fn from_flow(text: &str) -> Result<BTreeMap<String, String>, String> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .ok_or_else(|| format!("{KEY}: expected a mapping, found {text:?}"))?;
    split_outside_quotes(inner)?
        .into_iter()
        .filter(|item| !item.trim().is_empty())
        .map(|item| entry(item.trim()))
        .collect()
}

/// `NAME: VALUE`, either side plain or quoted.
fn entry(text: &str) -> Result<(String, String), String> {
    let (name, rest) = scalar_prefix(text)?;
    let value = rest
        .trim_start()
        .strip_prefix(':')
        .ok_or_else(|| format!("{KEY}: expected NAME: VALUE, found {text:?}"))?;
    let (value, after) = scalar_prefix(value.trim())?;
    if !after.trim().is_empty() {
        return Err(format!("{KEY}: unexpected {after:?} after {name}'s value"));
    }
    Ok((name, value))
}

/// A scalar at the start of `text` and what follows it. Plain scalars end at `:` followed
/// by a blank (a name) or at the end; YAML's other constructs are refused.
fn scalar_prefix(text: &str) -> Result<(String, &str), String> {
    match text.chars().next() {
        Some('"') => double_quoted(&text[1..]),
        Some('\'') => single_quoted(&text[1..]),
        Some(c @ ('|' | '>' | '&' | '*' | '!' | '[' | '{')) => Err(format!(
            "{KEY}: YAML's {c:?} is not read here; write plain or quoted values"
        )),
        Some('-') if text == "-" || text.starts_with("- ") => {
            Err(format!("{KEY}: a list is not read here"))
        }
        _ => {
            let end = plain_end(text);
            Ok((text[..end].trim_end().to_owned(), &text[end..]))
        }
    }
}

/// Where a plain scalar ends: at a `:` followed by a blank or the end of the text.
fn plain_end(text: &str) -> usize {
    text.match_indices(':')
        .map(|(i, _)| i)
        .find(|&i| text[i + 1..].is_empty() || text[i + 1..].starts_with([' ', '\t']))
        .unwrap_or(text.len())
}

fn double_quoted(text: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, e @ ('"' | '\\' | '/'))) => out.push(e),
                Some((_, 'n')) => out.push('\n'),
                Some((_, 't')) => out.push('\t'),
                other => {
                    return Err(format!(
                        "{KEY}: escape \\{} is not read here",
                        other.map_or(String::new(), |(_, c)| c.to_string())
                    ))
                }
            },
            c => out.push(c),
        }
    }
    Err(format!("{KEY}: unterminated double-quoted value"))
}

fn single_quoted(text: &str) -> Result<(String, &str), String> {
    let mut out = String::new();
    let mut rest = text;
    loop {
        let end = rest
            .find('\'')
            .ok_or_else(|| format!("{KEY}: unterminated single-quoted value"))?;
        out.push_str(&rest[..end]);
        rest = &rest[end + 1..];
        match rest.strip_prefix('\'') {
            Some(after) => {
                out.push('\'');
                rest = after;
            }
            None => return Ok((out, rest)),
        }
    }
}

/// Splits a flow mapping's items at commas outside quotes.
fn split_outside_quotes(text: &str) -> Result<Vec<&str>, String> {
    let mut items = Vec::new();
    let (mut start, mut quote) = (0, None);
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match (quote, c) {
            (Some('"'), '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (Some(q), c) if c == q && !escaped => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, ',') => {
                items.push(&text[start..i]);
                start = i + 1;
            }
            (None, '{' | '[') => return Err(format!("{KEY} holds more than names and values")),
            _ => {}
        }
        escaped = false;
    }
    if quote.is_some() {
        return Err(format!("{KEY}: unterminated quoted value"));
    }
    items.push(&text[start..]);
    Ok(items)
}

/// A line without its comment (` #` outside quotes starts one).
fn strip_comment(line: &str) -> &str {
    let mut quote = None;
    let mut previous = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') if previous.is_whitespace() => return line[..i].trim_end(),
            _ => {}
        }
        previous = c;
    }
    line.trim_end()
}

#[cfg(test)]
mod tests {
    use super::proxy_metadata;
    use std::collections::BTreeMap;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn reads_every_form_users_write() {
        let dns = map(&[("ISTIO_META_DNS_CAPTURE", "true")]);
        for config in [
            r#"{"proxyMetadata": {"ISTIO_META_DNS_CAPTURE": "true"}}"#,
            "proxyMetadata:\n  ISTIO_META_DNS_CAPTURE: \"true\"\n",
            "proxyMetadata:\n    ISTIO_META_DNS_CAPTURE: 'true'",
            "holdApplicationUntilProxyStarts: true\nproxyMetadata:\n  ISTIO_META_DNS_CAPTURE: true # on\ntracing:\n  sampling: 10\n",
            "proxyMetadata: {ISTIO_META_DNS_CAPTURE: \"true\"}",
            "# a comment\nproxyMetadata:   { ISTIO_META_DNS_CAPTURE: true }",
        ] {
            assert_eq!(proxy_metadata(config), Ok(dns.clone()), "{config}");
        }
    }

    #[test]
    fn other_keys_values_and_quoting_are_kept_apart() {
        let config = "tracing:\n  zipkin:\n    address: proxyMetadata:9411\nproxyMetadata:\n  A: 'it''s: x'\n  B: \"a, b # not a comment\"\n  C: plain value\nconcurrency: 2\n";
        assert_eq!(
            proxy_metadata(config),
            Ok(map(&[
                ("A", "it's: x"),
                ("B", "a, b # not a comment"),
                ("C", "plain value")
            ]))
        );
        assert_eq!(
            proxy_metadata(r#"proxyMetadata: {A: "x, y", B: 'z'}"#),
            Ok(map(&[("A", "x, y"), ("B", "z")]))
        );
    }

    #[test]
    fn no_metadata_is_empty() {
        for config in [
            "",
            "concurrency: 2",
            r#"{"concurrency": 2}"#,
            "tracing:\n  proxyMetadata: x",
        ] {
            assert_eq!(proxy_metadata(config), Ok(BTreeMap::new()), "{config}");
        }
    }

    #[test]
    fn what_is_not_understood_is_refused() {
        for config in [
            r#"{"proxyMetadata": {"A": ["x"]}}"#,
            r#"{"proxyMetadata": "#,
            "proxyMetadata:\n  A: |\n    multi\n",
            "proxyMetadata:\n  A:\n    B: c\n",
            "proxyMetadata: &anchor\n  A: b",
            "proxyMetadata: {A: [x]}",
            "proxyMetadata:\n  A: \"unterminated\n",
        ] {
            assert!(proxy_metadata(config).is_err(), "{config}");
        }
    }
}
