//! Deserializers for config tables that serde's derive reports badly.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_json::{Map, Value};

/// An enum written as a table chosen by its `type` field (`type = "kafka"`
/// beside the variant's fields), for an enum whose derive is externally
/// tagged (`{"kafka": {...}}`).
///
/// serde's own internally tagged enums buffer the table and lose the path
/// inside it, so a wrong field said only "for key `namespaces.x.backend`".
/// Here the table is turned into the external form and read with
/// `serde_path_to_error`, so an error names its field.
pub(super) fn by_type<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    let mut table = Map::deserialize(d)?;
    let kind = match table.remove("type") {
        Some(Value::String(kind)) => kind,
        Some(other) => {
            return Err(de::Error::custom(format!(
                "`type`: expected a string, got {other}"
            )));
        }
        None => return Err(de::Error::missing_field("type")),
    };
    from_env(&mut table).map_err(de::Error::custom)?;
    let external = Value::Object(Map::from_iter([(kind, Value::Object(table))]));
    serde_path_to_error::deserialize(external).map_err(|e| {
        // The first segment is the variant, which the user wrote as `type`.
        let field: Vec<String> = e.path().iter().skip(1).map(|s| s.to_string()).collect();
        let field = format!("`{}`", field.join("."));
        let inner = e.inner().to_string();
        let at = match e.path().iter().count() {
            0 => "`type`: ".to_string(),
            // At the table itself, or an error that names the field already
            // (an unknown one).
            1 => String::new(),
            _ if inner.contains(&field) => String::new(),
            _ => format!("{field}: "),
        };
        de::Error::custom(format!("{at}{inner}"))
    })
}

/// A field written as `<field>_env = "VAR"` takes its value from the
/// environment variable `VAR`, so a secret (a URL with a password, a token)
/// stays out of the config file.
fn from_env(table: &mut Map<String, Value>) -> Result<(), String> {
    let named: Vec<String> = table
        .keys()
        .filter(|k| k.ends_with("_env"))
        .cloned()
        .collect();
    for key in named {
        let field = key.trim_end_matches("_env").to_string();
        let Some(Value::String(var)) = table.remove(&key) else {
            return Err(format!(
                "`{key}`: expected the name of an environment variable"
            ));
        };
        if table.contains_key(&field) {
            return Err(format!("give `{field}` or `{key}`, not both"));
        }
        let value = std::env::var(&var).map_err(|_| {
            format!("`{key}`: the environment has no variable {var:?} (or it is not UTF-8)")
        })?;
        table.insert(field, Value::String(value));
    }
    Ok(())
}

/// A map of client options (`librdkafka`), whose values are strings to the
/// library; numbers and booleans are taken as written (`"linger.ms" = 5`).
pub(super) fn options<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    let map = BTreeMap::<String, OptionValue>::deserialize(d)?;
    Ok(map.into_iter().map(|(k, v)| (k, v.0)).collect())
}

struct OptionValue(String);

impl<'de> Deserialize<'de> for OptionValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(OptionVisitor)
    }
}

struct OptionVisitor;

impl Visitor<'_> for OptionVisitor {
    type Value = OptionValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a number or a boolean")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<OptionValue, E> {
        Ok(OptionValue(v.to_string()))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<OptionValue, E> {
        Ok(OptionValue(v.to_string()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<OptionValue, E> {
        Ok(OptionValue(v.to_string()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<OptionValue, E> {
        Ok(OptionValue(v.to_string()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<OptionValue, E> {
        Ok(OptionValue(v.to_string()))
    }
}

/// An optional table chosen by its `type` field ([`by_type`]).
pub(super) fn some_by_type<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    by_type(d).map(Some)
}

/// `[namespaces.N.targets.NAME]` tables: each a target chosen by `type`,
/// named by its key, with `start` and `group` beside the target's fields.
pub(super) fn targets<'de, D>(d: D) -> Result<Vec<super::TargetSpec>, D::Error>
where
    D: Deserializer<'de>,
{
    let tables = BTreeMap::<String, Map<String, Value>>::deserialize(d)?;
    let mut out = Vec::with_capacity(tables.len());
    for (name, mut table) in tables {
        let at = |e: &dyn fmt::Display| de::Error::custom(format!("`{name}`: {e}"));
        let start = match table.remove("start") {
            None => super::TargetStart::default(),
            Some(v) => super::TargetStart::deserialize(v).map_err(|e| {
                at(&format!(
                    "`start`: {e} (\"earliest\": the oldest entry the log holds; \"latest\": the next one)"
                ))
            })?,
        };
        let live = match table.remove("live") {
            None => true,
            Some(Value::Bool(b)) => b,
            Some(other) => return Err(at(&format!("`live`: expected true or false, got {other}"))),
        };
        let group = match table.remove("group") {
            None => None,
            Some(Value::String(g)) => Some(g),
            Some(other) => return Err(at(&format!("`group`: expected a string, got {other}"))),
        };
        match table.get("name") {
            Some(Value::String(n)) if *n == name => {}
            Some(other) => {
                return Err(at(&format!(
                    "`name`: a target in a `targets` table is named by its key ({name:?}); leave `name` out (got {other})"
                )));
            }
            None => {
                table.insert("name".into(), Value::String(name.clone()));
            }
        }
        let config = by_type(Value::Object(table)).map_err(|e: serde_json::Error| at(&e))?;
        out.push(super::TargetSpec {
            config,
            start,
            group,
            sole: false,
            live,
        });
    }
    Ok(out)
}
