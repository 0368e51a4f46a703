//! JSON as the model files need it: a key given twice is an error (serde_json would keep the
//! last one silently), and typed field access whose errors name the field and the type it must
//! have. Numbers and token ids may be `null` (unset, as transformers writes them); strings,
//! booleans and objects must have their type whenever the key is present.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::error::{Error, Result};

/// Parses `bytes` as JSON, refusing a key that appears twice in one object (at any depth).
pub fn parse(bytes: &[u8]) -> std::result::Result<Value, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = Strict.deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(v)
}

/// Builds a [`Value`] like serde_json does, but refuses duplicate keys.
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(Strict)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(x) = seq.next_element_seed(Strict)? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Value, A::Error> {
        let mut m = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(de::Error::custom(format!("duplicate key `{k}`")));
            }
            let v = map.next_value_seed(Strict)?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

/// A value for an error message, cut to a readable length.
fn show(x: &Value) -> String {
    let s = x.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

fn wrong(name: &str, what: &str, x: &Value) -> Error {
    Error::Config(format!("`{name}` must be {what}, got {}", show(x)))
}

/// `v[key]` as a string (`name` is the field as errors show it).
pub fn opt_str<'a>(v: &'a Value, key: &str, name: &str) -> Result<Option<&'a str>> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(x) => Err(wrong(name, "a string", x)),
    }
}

/// `v[key]` as a boolean.
pub fn opt_bool(v: &Value, key: &str, name: &str) -> Result<Option<bool>> {
    match v.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(x) => Err(wrong(name, "true or false", x)),
    }
}

/// `v[key]` as an object.
pub fn opt_object<'a>(v: &'a Value, key: &str, name: &str) -> Result<Option<&'a Value>> {
    match v.get(key) {
        None => Ok(None),
        Some(o @ Value::Object(_)) => Ok(Some(o)),
        Some(x) => Err(wrong(name, "an object", x)),
    }
}

/// `v[key]` as a non-negative integer (null: unset).
pub fn opt_usize(v: &Value, key: &str, name: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| wrong(name, "a non-negative integer", x)),
    }
}

/// `v[key]` as a number (null: unset).
pub fn opt_f32(v: &Value, key: &str, name: &str) -> Result<Option<f32>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(|n| Some(n as f32))
            .ok_or_else(|| wrong(name, "a number", x)),
    }
}

/// `v[key]` as a token id or a list of them (null or absent: none).
pub fn token_ids(v: &Value, key: &str) -> Result<Vec<u32>> {
    let to_id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| wrong(key, "a token id or a list of them", x))
    };
    match v.get(key) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(to_id).collect(),
        Some(x) => Ok(vec![to_id(x)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert!(parse(br#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#).is_ok());
        let e = parse(br#"{"a": 1, "a": 1}"#).unwrap_err();
        assert!(e.contains("duplicate key `a`"), "{e}");
        let e = parse(br#"{"q": {"x": [{"k": 1, "k": 2}]}}"#).unwrap_err();
        assert!(e.contains("duplicate key `k`"), "{e}");
        assert!(parse(b"{} x").is_err());
        assert_eq!(
            parse(br#"{"n": -1, "f": 1.5, "s": "t", "z": null}"#).unwrap(),
            serde_json::json!({"n": -1, "f": 1.5, "s": "t", "z": null})
        );
    }

    #[test]
    fn typed_fields_name_the_field_and_the_type() {
        let v = serde_json::json!({"s": 3, "b": "yes", "o": [1, 2], "n": null, "u": -1});
        let msg = |e: Error| e.to_string();
        assert!(msg(opt_str(&v, "s", "q.s").unwrap_err()).contains("`q.s` must be a string, got 3"));
        assert!(msg(opt_bool(&v, "b", "b").unwrap_err()).contains("true or false"));
        assert!(msg(opt_object(&v, "o", "o").unwrap_err()).contains("an object, got [1,2]"));
        assert!(opt_object(&v, "n", "n").is_err(), "null is not an object");
        assert_eq!(opt_usize(&v, "n", "n").unwrap(), None);
        assert!(opt_usize(&v, "u", "u").is_err());
        assert_eq!(opt_str(&v, "missing", "m").unwrap(), None);
        assert!(token_ids(&v, "u").is_err());
    }
}
