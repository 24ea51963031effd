//! Progress for long work. On a terminal: one redrawn line (position, elapsed, ETA and a message
//! such as the loss). Elsewhere (CI logs, pipes, files), where a redrawn bar is noise: a plain
//! line at every tenth of the way, with the same message. `quiet` shows neither.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A progress report of `len` steps.
#[derive(Debug)]
pub(crate) struct Progress {
    bar: ProgressBar,
    /// Plain lines instead of the bar (stderr is not a terminal).
    lines: bool,
    quiet: bool,
    what: String,
    len: u64,
    pos: u64,
    /// Where this process started (a resumed run starts past 0).
    first: u64,
    msg: String,
    start: Instant,
}

impl Progress {
    /// A report labelled `what`.
    pub(crate) fn new(len: u64, what: &str, quiet: bool) -> Progress {
        let lines = !std::io::stderr().is_terminal();
        let target = if quiet || lines {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(len), target);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} step {pos}/{len} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(what.to_string());
        Progress {
            bar,
            lines,
            quiet,
            what: what.to_string(),
            len,
            pos: 0,
            first: 0,
            msg: String::new(),
            start: Instant::now(),
        }
    }

    /// Jumps to `pos` (a resumed run).
    pub(crate) fn set_position(&mut self, pos: u64) {
        self.pos = pos;
        self.first = pos;
        self.bar.set_position(pos);
    }

    /// The message shown beside the position.
    pub(crate) fn set_message(&mut self, msg: String) {
        self.bar.set_message(msg.clone());
        self.msg = msg;
    }

    /// One step done.
    pub(crate) fn inc(&mut self) {
        self.pos += 1;
        self.bar.inc(1);
        let tenth = self.len.div_ceil(10).max(1);
        if self.lines && !self.quiet && (self.pos.is_multiple_of(tenth) || self.pos == self.len) {
            let t = self.start.elapsed().as_secs_f64();
            let done = (self.pos - self.first).max(1) as f64;
            let eta = t / done * self.len.saturating_sub(self.pos) as f64;
            eprintln!(
                "{}: step {}/{} {} [{t:.1}s, ETA {eta:.0}s]",
                self.what, self.pos, self.len, self.msg
            );
        }
    }

    /// Done: the bar goes away.
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// Stopped early: the bar stays as it is.
    pub(crate) fn abandon(&self) {
        self.bar.abandon();
    }
}
