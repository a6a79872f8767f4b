//! Progress of long waits: a spinner with elapsed time on a terminal, plain log lines elsewhere (launchd, CI).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
}

impl Progress {
    pub fn start(message: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} {msg} ({elapsed})").expect("valid template"));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        let progress = Progress { bar, started: Instant::now() };
        progress.step(message);
        progress
    }

    pub fn step(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(message.to_string()),
            None => tracing::info!("{message}"),
        }
    }

    pub fn finish(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(message.to_string()),
            None => tracing::info!("{message}"),
        }
    }

    pub fn fail(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.abandon_with_message(format!("failed after {:.1} s: {message}", self.started.elapsed().as_secs_f64())),
            None => tracing::error!("{message}"),
        }
    }
}
