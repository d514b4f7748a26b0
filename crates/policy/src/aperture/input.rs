//! Reading Aperture's policy as written: mappings whose every field is
//! either taken or listed, scalars in protobuf's JSON forms, and the list
//! of what is not carried over.

use serde_json::{Map, Value};

use super::Skipped;

/// Why a field (or the component holding it) is not carried over, and
/// where it is in the input.
#[derive(Debug)]
pub(super) struct Skip {
    /// Path in the input, e.g. `spec.circuit.components[2].flow_control`.
    pub path: String,
    /// Why.
    pub reason: String,
}

impl Skip {
    pub(super) fn new(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Skip {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// What a conversion gathers besides the output.
#[derive(Default)]
pub(super) struct Cx {
    /// What is not carried over, in the order met.
    pub skipped: Vec<Skipped>,
    /// Every selector's agent group (Aperture's default when not given),
    /// with where it was written: Sluice selectors have none.
    pub agent_groups: Vec<(String, String)>,
}

impl Cx {
    /// Lists `skip`.
    pub(super) fn skip(&mut self, skip: Skip) {
        if !self.skipped.iter().any(|s| s.path == skip.path) {
            self.skipped.push(Skipped {
                path: skip.path,
                reason: skip.reason,
            });
        }
    }
}

/// `base.key`, or `key` at the top.
pub(super) fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_owned()
    } else {
        format!("{base}.{key}")
    }
}

/// `base[i]`.
pub(super) fn index(base: &str, i: usize) -> String {
    format!("{base}[{i}]")
}

/// A mapping of the input at `path`. Fields are taken one by one; when the
/// reading is done, [`Obj::finish`] lists every field that was not, so
/// that nothing is left out silently.
pub(super) struct Obj<'a> {
    /// The mapping.
    map: &'a Map<String, Value>,
    /// Where the mapping is.
    pub path: String,
    /// The fields read (or ignored on purpose) so far.
    taken: Vec<&'a str>,
}

impl<'a> Obj<'a> {
    /// `value`, which must be a mapping.
    pub(super) fn new(value: &'a Value, path: String) -> Result<Self, Skip> {
        match value {
            Value::Object(map) => Ok(Obj {
                map,
                path,
                taken: Vec::new(),
            }),
            other => Err(Skip::new(
                path,
                format!("expected a mapping, found {}", kind(other)),
            )),
        }
    }

    /// The path of field `key`.
    pub(super) fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Field `key`: `None` when absent or null (protobuf's JSON reads null
    /// as the default).
    pub(super) fn get(&mut self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.taken.push(k.as_str());
        (!v.is_null()).then_some(v)
    }

    /// Field `key`, required.
    pub(super) fn need(&mut self, key: &str) -> Result<&'a Value, Skip> {
        self.get(key)
            .ok_or_else(|| Skip::new(self.at(key), "required, and missing"))
    }

    /// Whether field `key` is there (not null).
    pub(super) fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    /// Field `key` as a mapping.
    pub(super) fn obj(&mut self, key: &str) -> Result<Option<Obj<'a>>, Skip> {
        let path = self.at(key);
        self.get(key).map(|v| Obj::new(v, path)).transpose()
    }

    /// Field `key` as a mapping, required.
    pub(super) fn need_obj(&mut self, key: &str) -> Result<Obj<'a>, Skip> {
        self.obj(key)?
            .ok_or_else(|| Skip::new(self.at(key), "required, and missing"))
    }

    /// Field `key` as text.
    pub(super) fn str(&mut self, key: &str) -> Result<Option<&'a str>, Skip> {
        let path = self.at(key);
        self.get(key).map(|v| text(v, &path)).transpose()
    }

    /// Field `key` as text, empty as absent (protobuf's default).
    pub(super) fn non_empty(&mut self, key: &str) -> Result<Option<&'a str>, Skip> {
        Ok(self.str(key)?.filter(|s| !s.is_empty()))
    }

    /// Field `key` as a number.
    pub(super) fn f64(&mut self, key: &str) -> Result<Option<f64>, Skip> {
        let path = self.at(key);
        self.get(key).map(|v| number(v, &path)).transpose()
    }

    /// Field `key` as a boolean.
    pub(super) fn bool(&mut self, key: &str) -> Result<Option<bool>, Skip> {
        let path = self.at(key);
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Skip::new(
                path,
                format!("expected true or false, found {}", kind(other)),
            )),
        }
    }

    /// Field `key` as a list.
    pub(super) fn list(&mut self, key: &str) -> Result<&'a [Value], Skip> {
        let path = self.at(key);
        match self.get(key) {
            None => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(other) => Err(Skip::new(
                path,
                format!("expected a list, found {}", kind(other)),
            )),
        }
    }

    /// Field `key` as a mapping's entries, in the order written.
    pub(super) fn entries(&mut self, key: &str) -> Result<Vec<(&'a str, &'a Value)>, Skip> {
        let path = self.at(key);
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => Ok(m.iter().map(|(k, v)| (k.as_str(), v)).collect()),
            Some(other) => Err(Skip::new(
                path,
                format!("expected a mapping, found {}", kind(other)),
            )),
        }
    }

    /// Field `key` as a duration in protobuf's JSON form (`"10s"`,
    /// `"0.5s"`), as text Sluice reads.
    pub(super) fn duration(&mut self, key: &str) -> Result<Option<Duration>, Skip> {
        let path = self.at(key);
        self.str(key)?
            .map(|s| {
                sluice_time::parse_duration(s)
                    .map(|d| Duration {
                        text: s.to_owned(),
                        value: d,
                    })
                    .map_err(|e| Skip::new(path, format!("not a duration: {e}")))
            })
            .transpose()
    }

    /// Marks `keys` as read without using them: fields that change nothing
    /// in Sluice (docs/migrating-from-aperture.md says which and why).
    pub(super) fn ignore(&mut self, keys: &[&str]) {
        for key in keys {
            self.get(key);
        }
    }

    /// Lists the fields that were not taken, as not fields of `what`.
    pub(super) fn finish(self, cx: &mut Cx, what: &str) {
        for key in self.map.keys() {
            if !self.taken.contains(&key.as_str()) {
                cx.skip(Skip::new(
                    join(&self.path, key),
                    format!("not a field of Aperture's {what} that Sluice knows"),
                ));
            }
        }
    }
}

/// A duration read from the input.
#[derive(Clone, Debug)]
pub(super) struct Duration {
    /// As written, which Sluice reads as it is.
    pub text: String,
    /// Its value.
    pub value: std::time::Duration,
}

/// A scalar as text (protobuf's JSON has strings; YAML may give a number or
/// a boolean for a label value).
pub(super) fn scalar_text(v: &Value, path: &str) -> Result<String, Skip> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(Skip::new(
            path,
            format!("expected text, found {}", kind(other)),
        )),
    }
}

/// Text.
pub(super) fn text<'a>(v: &'a Value, path: &str) -> Result<&'a str, Skip> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(Skip::new(
            path,
            format!("expected text, found {}", kind(other)),
        )),
    }
}

/// A number, or its text (protobuf's JSON writes 64-bit integers as text).
pub(super) fn number(v: &Value, path: &str) -> Result<f64, Skip> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.ok_or_else(|| Skip::new(path, format!("expected a number, found {}", kind(v))))
}

/// What a value is, for messages.
pub(super) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
