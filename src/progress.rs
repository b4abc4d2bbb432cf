//! Progress display shared by the CLI and the examples: an indicatif bar on stderr.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::control::TransferStatus;

/// A progress bar for one transfer (bytes, rate, ETA) on stderr; indicatif hides it when
/// stderr is not a terminal, so logs and `--json` output stay clean.
pub struct TransferBar {
    bar: ProgressBar,
}

impl TransferBar {
    pub fn new(label: &str) -> TransferBar {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_string());
        TransferBar { bar }
    }

    /// Updates from a progress event.
    pub fn update(&self, s: &TransferStatus) {
        self.bar.set_length(s.bytes_total);
        self.bar.set_position(s.bytes_done);
        if s.state != "copying" {
            self.bar.set_message(s.state.clone());
        } else {
            self.bar.set_message(String::new());
        }
    }

    /// Updates from a mount report.
    pub fn update_mount(&self, s: &crate::control::MountStatus) {
        self.bar.set_length(s.bytes_total);
        self.bar.set_position(s.bytes_present);
        self.bar.set_message(format!("{} faults", s.faults));
    }

    /// Ends the bar, leaving it on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }

    /// Ends the bar and removes it.
    pub fn clear(&self) {
        self.bar.finish_and_clear();
    }

    /// Prints a line above the bar without garbling it.
    pub fn println(&self, line: &str) {
        self.bar.println(line);
    }
}
