//! Errors about user input: they name the file, the object and the field, so an
//! operator can fix the manifest; everything else keeps working.
use std::fmt;

/// A problem with one object (or one file) of the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InputError {
    /// Where the object came from (a file name, or "api" in cluster mode).
    pub file: String,
    /// `Kind namespace/name`, or `document N` when the document has no name yet.
    pub object: String,
    /// The field at fault (`spec.ports[0].port`), empty for whole-document errors.
    pub field: String,
    pub message: String,
}

impl InputError {
    pub fn new(
        source: impl Into<String>,
        object: impl Into<String>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: source.into(),
            object: object.into(),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.file, self.object)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}
