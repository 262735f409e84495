//! Volume and snapshot names. Names become directory names and NBD export
//! names, so they are restricted to a small, portable alphabet: no path
//! separators, no `..`, no control bytes, no leading dot or dash.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted name, in bytes. Cinder names are `volume-<uuid>` (43 bytes).
pub const MAX_NAME_BYTES: usize = 128;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name was empty.
    #[error("name is empty")]
    Empty,
    /// The name was longer than [`MAX_NAME_BYTES`].
    #[error("name is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong {
        /// Length of the refused name in bytes.
        len: usize,
    },
    /// The name held a byte outside `[A-Za-z0-9._-]`.
    #[error("name contains {found:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadCharacter {
        /// The first offending character.
        found: char,
    },
    /// The name started with `.` or `-` (hidden files, command-line flags).
    #[error("name must not start with '.' or '-'")]
    BadStart,
}

fn validate(raw: &str) -> Result<(), NameError> {
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { len: raw.len() });
    }
    if let Some(found) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(NameError::BadCharacter { found });
    }
    if raw.starts_with('.') || raw.starts_with('-') {
        return Err(NameError::BadStart);
    }
    Ok(())
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $ty:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(String);

        impl $ty {
            /// Validates `raw` and wraps it.
            ///
            /// # Errors
            /// [`NameError`] when `raw` is empty, too long, or holds a
            /// character outside `[A-Za-z0-9._-]`.
            pub fn new(raw: impl Into<String>) -> Result<Self, NameError> {
                let raw = raw.into();
                validate(&raw)?;
                Ok(Self(raw))
            }

            /// The name as a string slice; safe to use as a file name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(raw: String) -> Result<Self, NameError> {
                Self::new(raw)
            }
        }

        impl From<$ty> for String {
            fn from(name: $ty) -> String {
                name.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

validated_name!(
    /// The name of a volume: unique per agent, a directory name in the data
    /// dir and the NBD export name.
    VolumeName
);
validated_name!(
    /// The name of a snapshot: unique per volume. Exported read-only over NBD
    /// as `VOLUME@SNAPSHOT`.
    SnapshotName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_cinder_style_names() {
        assert!(VolumeName::new("volume-0b9f3e4c-6f1e-4d2a-9a55-3c1d2e0f9a10").is_ok());
        assert!(SnapshotName::new("snap_1.daily").is_ok());
    }

    #[test]
    fn refuses_traversal_and_odd_bytes() {
        for bad in [
            "", "..", ".hidden", "-rf", "a/b", "a\\b", "a\0b", "tab\t", "é", "a b",
        ] {
            assert!(VolumeName::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(
            VolumeName::new("x".repeat(MAX_NAME_BYTES + 1)),
            Err(NameError::TooLong {
                len: MAX_NAME_BYTES + 1
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn accepted_names_are_single_safe_path_components(raw in ".{0,140}") {
            if let Ok(name) = VolumeName::new(raw) {
                let path = std::path::Path::new(name.as_str());
                proptest::prop_assert_eq!(path.components().count(), 1);
                proptest::prop_assert!(matches!(
                    path.components().next(),
                    Some(std::path::Component::Normal(_))
                ));
            }
        }
    }
}
