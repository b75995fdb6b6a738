//! The daemon's log: `<entry>/daemon.log`, one line per `log` record (the guest console
//! included, at info). The daemon's stdio is the container's, so nothing of ours goes there.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

struct FileLogger {
    file: Mutex<File>,
}

impl log::Log for FileLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let time = chrono::Utc::now().format("%H:%M:%S%.3f");
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(f, "{time} {} {}", record.level(), record.args());
    }

    fn flush(&self) {}
}

/// Sends `log` records to `file` (once per process; later calls are ignored).
pub fn init(file: File) {
    let logger = Box::leak(Box::new(FileLogger {
        file: Mutex::new(file),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
