//! The JSON Schema of a policy file, derived from the policy types.
//!
//! The types in this module tree are the source of truth for what a policy
//! may contain: their field doc comments become the schema's descriptions
//! and their serde defaults its `default`s. `sluice schema` prints it, so
//! that editors (yaml-language-server) can check and complete policies,
//! and `tests/policy_reference.rs` checks `docs/policy.md` and
//! `docs/controller.md` against it.
//!
//! The schema describes shapes, types and ranges. Rules across fields (one
//! extractor per classifier rule, unique names, circuit wiring...) are only
//! checked by the loader: `sluice validate`.

use schemars::generate::SchemaSettings;
use schemars::transform::RecursiveTransform;
use serde_json::Value;

use super::Policy;

/// The JSON Schema of one policy file, in draft-07: yaml-language-server
/// supports JSON Schema 7 and below.
pub fn policy_schema() -> Value {
    let generator = SchemaSettings::draft07()
        .with_transform(RecursiveTransform(tidy))
        .into_generator();
    let mut schema = generator.into_root_schema_for::<Policy>().to_value();
    if let Some(root) = schema.as_object_mut() {
        root.insert("title".to_owned(), "Sluice policy".into());
    }
    schema
}

/// Drops `default: null` (an absent optional field says the same) and
/// joins the lines of each doc-comment paragraph, for editors' hovers.
fn tidy(schema: &mut schemars::Schema) {
    if schema.get("default").is_some_and(Value::is_null) {
        schema.remove("default");
    }
    if let Some(Value::String(text)) = schema.get_mut("description") {
        *text = text
            .split("\n\n")
            .map(|paragraph| paragraph.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join("\n\n");
    }
}

/// A label value, in the schema: the loader reads any YAML scalar into a
/// `String` (`tier: 1` is `"1"`, `http.flavor: 1.1` is `"1.1"`), so the
/// schema accepts numbers and booleans there too rather than have editors
/// flag what loads.
pub(crate) struct ScalarText;

impl schemars::JsonSchema for ScalarText {
    fn inline_schema() -> bool {
        true
    }
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ScalarText".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": ["string", "number", "boolean"] })
    }
}
