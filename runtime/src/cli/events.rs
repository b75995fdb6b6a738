//! `husk events [--stats] [--interval S] ID`: resource usage of a container, one JSON
//! object per line (`{"type":"stats","id":...,"data":...}`); once with --stats.

use std::process::ExitCode;
use std::time::Duration;

use husk::sandbox::lifecycle;

use super::Global;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the stats once and exit
    #[arg(long)]
    pub stats: bool,
    /// Seconds between two stats
    #[arg(long, default_value_t = 5)]
    pub interval: u64,
    /// The container id
    pub id: String,
}

pub fn run(args: Args, g: &Global) -> anyhow::Result<ExitCode> {
    let store = g.store()?;
    loop {
        let data = lifecycle::stats(&store, &args.id)?;
        let event = serde_json::json!({"type": "stats", "id": args.id, "data": data});
        println!("{event}");
        if args.stats {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(args.interval.max(1)));
    }
}
