//! `--log` / `--log-format`: errors written to a file as runc writes them, so a caller
//! (Docker, containerd's shim) can show why a command failed.

use std::io::Write;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// One log line in `format`.
pub fn line(format: Format, level: &str, msg: &str, time: &str) -> String {
    match format {
        Format::Json => serde_json::json!({"level": level, "msg": msg, "time": time}).to_string(),
        Format::Text => format!("time=\"{time}\" level={level} msg={msg:?}"),
    }
}

/// Appends an error line; a log that cannot be written must not hide the error itself,
/// which is on stderr already.
pub fn error(path: &Path, format: Format, msg: &str) {
    let time = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{}", line(format, "error", msg, &time));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_text_lines() {
        let j: serde_json::Value =
            serde_json::from_str(&line(Format::Json, "error", "a \"b\"", "t")).unwrap();
        assert_eq!(j["level"], "error");
        assert_eq!(j["msg"], "a \"b\"");
        assert_eq!(
            line(Format::Text, "error", "x y", "t"),
            "time=\"t\" level=error msg=\"x y\""
        );
    }
}
