//! A Postgres target's connection string, with libpq's TLS settings.
//!
//! tokio-postgres parses `sslmode` as `disable`, `prefer` or `require` only,
//! and knows no `sslrootcert`. Walden takes both out of the string first, so
//! `verify-ca`, `verify-full` and a private CA mean what they mean to libpq.

use std::path::PathBuf;

/// `sslmode`, as libpq reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS if the server offers it, unverified; plain otherwise (libpq's
    /// default).
    #[default]
    Prefer,
    /// TLS or no connection, unverified: encrypted, but anyone on the path
    /// could pose as the server. With `sslrootcert`, as `VerifyCa` (libpq).
    Require,
    /// TLS, with the server's certificate chained to a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }
}

/// A parsed Postgres connection string.
#[derive(Clone, Debug)]
pub struct PostgresUrl {
    pub config: tokio_postgres::Config,
    pub ssl_mode: SslMode,
    /// `sslrootcert`: the CA file to trust; `None`: the system's roots.
    pub root_cert: Option<PathBuf>,
}

/// Parse a URL (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) or a
/// `key=value` string. The error never repeats the input: it may hold a
/// password.
pub fn parse_postgres_url(url: &str) -> Result<PostgresUrl, String> {
    let mut ssl_mode = SslMode::default();
    let mut root_cert = None;
    let mut take = |key: &str, value: &str| -> Result<bool, String> {
        match key {
            "sslmode" => {
                ssl_mode = SslMode::parse(value).ok_or_else(|| {
                    format!(
                        "sslmode {value:?} is not disable, prefer, require, verify-ca or verify-full"
                    )
                })?;
                Ok(true)
            }
            "sslrootcert" => {
                root_cert = Some(PathBuf::from(value));
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, &percent_decode(v))? {
                        kept.push(pair);
                    }
                }
                match kept.is_empty() {
                    true => base.to_string(),
                    false => format!("{base}?{}", kept.join("&")),
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for pair in url.split_whitespace() {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k.trim(), v.trim_matches('\''))? {
                kept.push(pair);
            }
        }
        kept.join(" ")
    };
    let mut config = rest
        .parse::<tokio_postgres::Config>()
        .map_err(|e| e.to_string())?;
    config.ssl_mode(match ssl_mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok(PostgresUrl {
        config,
        ssl_mode,
        root_cert,
    })
}

/// `%XX` escapes, as a URL's query may carry them in a path.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_settings_are_taken_out_of_a_url() {
        let p = parse_postgres_url(
            "postgres://u:pw@db.example:5433/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=w",
        )
        .unwrap();
        assert_eq!(p.ssl_mode, SslMode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.config.get_application_name(), Some("w"));
        assert_eq!(
            p.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
    }

    #[test]
    fn libpq_tls_settings_are_taken_out_of_key_values() {
        let p = parse_postgres_url("host=db user=u sslmode=verify-ca sslrootcert=/ca.pem").unwrap();
        assert_eq!(p.ssl_mode, SslMode::VerifyCa);
        assert_eq!(p.root_cert, Some(PathBuf::from("/ca.pem")));
        assert_eq!(p.config.get_user(), Some("u"));
    }

    #[test]
    fn the_default_is_prefer_and_a_bad_mode_is_named() {
        let p = parse_postgres_url("postgres://u@127.0.0.1/db").unwrap();
        assert_eq!(p.ssl_mode, SslMode::Prefer);
        let e = parse_postgres_url("postgres://u:secret@h/db?sslmode=always").unwrap_err();
        assert!(e.contains("\"always\""), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }
}
