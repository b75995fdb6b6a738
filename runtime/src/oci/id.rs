//! Container ids: what may be used as a directory name under `--root`.

/// Errors validating a container id.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum IdError {
    /// container id must not be empty
    Empty,
    /// invalid container id {0:?}: use only letters, digits, '_', '+', '-' and '.' (not "." or "..")
    Invalid(String),
}

/// Checks `id` as runc does: `[A-Za-z0-9_+.-]+`, and not `.` or `..`.
pub fn validate(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if !ok_chars || id == "." || id == ".." {
        return Err(IdError::Invalid(id.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_runc_ids_and_rejects_paths() {
        for good in ["a", "abc-1.2_x+y", "0123456789abcdef"] {
            assert_eq!(validate(good), Ok(()), "{good}");
        }
        assert_eq!(validate(""), Err(IdError::Empty));
        for bad in [".", "..", "a/b", "../x", "a b", "a\n", "é"] {
            assert!(matches!(validate(bad), Err(IdError::Invalid(_))), "{bad}");
        }
    }
}
