//! Opaque identifiers. They are UUIDs on the wire; parsing is strict so a
//! malformed id is a `400`, never a lookup of something else.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A malformed identifier.
#[derive(Debug, thiserror::Error)]
#[error("malformed {kind} id {value:?}: expected a UUID")]
pub struct IdError {
    kind: &'static str,
    value: String,
}

macro_rules! id_type {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }

            /// Parses the canonical hyphenated form.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                // `Uuid::parse_str` also accepts braced and URN forms; the API
                // only ever hands out the hyphenated one, so only that is valid.
                match Uuid::try_parse(s) {
                    Ok(u) if s.len() == 36 => Ok(Self(u)),
                    _ => Err(IdError {
                        kind: $kind,
                        value: s.chars().take(64).collect(),
                    }),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .format(Some(utoipa::openapi::SchemaFormat::Custom("uuid".into())))
                    .into()
            }
        }
        impl utoipa::ToSchema for $name {}
    };
}

id_type!(SessionId, "session", "Identifies a session.");
id_type!(TurnId, "turn", "Identifies one agent turn of a session.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_other_forms() {
        let id = SessionId::new();
        assert_eq!(SessionId::parse(&id.to_string()).ok(), Some(id));
        assert!(SessionId::parse("not-a-uuid").is_err());
        let braced = format!("{{{id}}}");
        assert!(SessionId::parse(&braced).is_err());
        assert!(SessionId::parse(&id.to_string().replace('-', "")).is_err());
    }
}
