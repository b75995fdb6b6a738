//! Signals as `husk kill` takes them: names with or without `SIG`, any case, or numbers.

use nix::sys::signal::Signal;

/// Errors parsing a signal.
#[derive(Debug, thiserror::Error, displaydoc::Display, PartialEq, Eq)]
pub enum SignalError {
    /// unknown signal {0:?}: use a name (TERM, SIGKILL, ...) or a number (1-64)
    Unknown(String),
}

/// Parses `KILL`, `sigkill`, `SIGKILL` or `9`; real-time signals by number only.
pub fn parse(s: &str) -> Result<i32, SignalError> {
    let unknown = || SignalError::Unknown(s.to_string());
    if let Ok(n) = s.parse::<i32>() {
        return if (1..=libc::SIGRTMAX()).contains(&n) {
            Ok(n)
        } else {
            Err(unknown())
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| unknown())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse("KILL"), Ok(9));
        assert_eq!(parse("sigterm"), Ok(15));
        assert_eq!(parse("SIGUSR1"), Ok(libc::SIGUSR1));
        assert_eq!(parse("15"), Ok(15));
        assert_eq!(parse("34"), Ok(34));
        for bad in ["0", "-1", "65", "FOO", "SIG", ""] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
