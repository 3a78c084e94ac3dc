//! Live log lines and progress of running attempts, within fixed budgets.
//!
//! Each attempt may report at most [`MAX_LINES_PER_ATTEMPT`] lines (log lines
//! and progress reports together) and [`MAX_BYTES_PER_ATTEMPT`] bytes; a line
//! is cut at [`MAX_LINE_BYTES`]. What goes over the budget, or arrives while
//! the execution's runner is too busy to take it, is dropped and counted; the
//! runner records the count in one last `system` log line of the attempt. So
//! a step printing gigabytes costs bounded memory and bounded database rows.

use std::sync::{Mutex, OnceLock};

use tokio::sync::mpsc;

use crate::domain::limits;
use crate::domain::status::LogStream;
use crate::engine::secrets::Redactor;

/// Longest line kept; the rest of a longer line is cut off.
pub const MAX_LINE_BYTES: usize = 4096;
/// Most lines (and progress reports) kept per attempt.
pub const MAX_LINES_PER_ATTEMPT: u64 = 1000;
/// Most bytes of lines kept per attempt.
pub const MAX_BYTES_PER_ATTEMPT: usize = 256 * 1024;

/// Something a running attempt reports.
#[derive(Debug, Clone, PartialEq)]
pub enum StepReport {
    Log { stream: LogStream, line: String },
    Progress { percent: f64, message: String },
}

/// A report, addressed to its step and attempt.
#[derive(Debug)]
pub struct Report {
    pub index: usize,
    pub attempt: u32,
    pub report: StepReport,
}

/// Hands an attempt's reports to its runner, within the budget.
pub struct Reporter {
    index: usize,
    attempt: u32,
    sender: Option<mpsc::Sender<Report>>,
    budget: Mutex<Budget>,
    /// Masks the attempt's secrets in what it reports.
    redactor: OnceLock<Redactor>,
}

#[derive(Default)]
struct Budget {
    lines: u64,
    bytes: usize,
    dropped: u64,
}

impl Reporter {
    pub fn new(index: usize, attempt: u32, sender: mpsc::Sender<Report>) -> Self {
        Self {
            index,
            attempt,
            sender: Some(sender),
            budget: Mutex::default(),
            redactor: OnceLock::new(),
        }
    }

    /// A reporter that keeps nothing.
    pub fn discard() -> Self {
        Self {
            index: 0,
            attempt: 0,
            sender: None,
            budget: Mutex::default(),
            redactor: OnceLock::new(),
        }
    }

    /// Masks these secrets in every line and progress message reported
    /// from now on; set once, before the attempt runs.
    pub fn redact_with(&self, redactor: Redactor) {
        let _ = self.redactor.set(redactor);
    }

    fn redact(&self, text: String) -> String {
        match self.redactor.get() {
            Some(redactor) if !redactor.is_empty() => redactor.text(&text).into_owned(),
            _ => text,
        }
    }

    /// Reports one line (without its newline); invalid UTF-8 is replaced.
    pub fn log(&self, stream: LogStream, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // Masked before the cut, so that a secret across it is masked too.
        let kept = &line[..line.len().min(2 * MAX_LINE_BYTES)];
        let mut text = self.redact(String::from_utf8_lossy(kept).into_owned());
        if text.len() > MAX_LINE_BYTES || line.len() > kept.len() {
            let mut end = MAX_LINE_BYTES.min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push_str(" [line cut]");
        }
        let text = limits::without_nul(text);
        let size = text.len();
        self.send(size, StepReport::Log { stream, line: text });
    }

    /// Reports progress; `percent` is clamped to 0..=100, NaN is ignored.
    pub fn progress(&self, percent: f64, message: &str) {
        if percent.is_nan() {
            return;
        }
        let message = self.redact(message.to_string());
        let message = limits::without_nul(message.chars().take(MAX_LINE_BYTES).collect());
        let size = message.len();
        self.send(
            size,
            StepReport::Progress {
                percent: percent.clamp(0.0, 100.0),
                message,
            },
        );
    }

    /// How many reports were dropped so far.
    pub fn dropped(&self) -> u64 {
        self.budget.lock().expect("budget lock").dropped
    }

    fn send(&self, size: usize, report: StepReport) {
        let Some(sender) = &self.sender else { return };
        let mut budget = self.budget.lock().expect("budget lock");
        if budget.lines >= MAX_LINES_PER_ATTEMPT || budget.bytes + size > MAX_BYTES_PER_ATTEMPT {
            budget.dropped += 1;
            return;
        }
        let report = Report {
            index: self.index,
            attempt: self.attempt,
            report,
        };
        match sender.try_send(report) {
            Ok(()) => {
                budget.lines += 1;
                budget.bytes += size;
            }
            Err(_) => budget.dropped += 1,
        }
    }
}

/// Splits a byte stream into lines for a reporter.
pub struct LineSplitter<'a> {
    reporter: &'a Reporter,
    stream: LogStream,
    partial: Vec<u8>,
}

impl<'a> LineSplitter<'a> {
    pub fn new(reporter: &'a Reporter, stream: LogStream) -> Self {
        Self {
            reporter,
            stream,
            partial: Vec::new(),
        }
    }

    /// Feeds bytes; every completed non-empty line is reported.
    pub fn feed(&mut self, bytes: &[u8]) {
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            if let Some(line) = piece.strip_suffix(b"\n") {
                self.keep(line);
                self.emit();
            } else {
                self.keep(piece);
            }
        }
    }

    /// Reports the last, unterminated line.
    pub fn finish(mut self) {
        self.emit();
    }

    fn keep(&mut self, bytes: &[u8]) {
        // One byte more than the cut, so the reporter marks the line as cut.
        let room = (MAX_LINE_BYTES + 1).saturating_sub(self.partial.len());
        self.partial
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
    }

    fn emit(&mut self) {
        if !self.partial.iter().all(u8::is_ascii_whitespace) {
            self.reporter.log(self.stream, &self.partial);
        }
        self.partial.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(rx: &mut mpsc::Receiver<Report>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(report) = rx.try_recv() {
            if let StepReport::Log { line, .. } = report.report {
                out.push(line);
            }
        }
        out
    }

    #[test]
    fn splits_lines_across_chunks_and_cuts_long_ones() {
        let (tx, mut rx) = mpsc::channel(100);
        let reporter = Reporter::new(0, 1, tx);
        let mut split = LineSplitter::new(&reporter, LogStream::Stdout);
        split.feed(b"one\ntw");
        split.feed(b"o\n\n");
        split.feed(&vec![b'x'; MAX_LINE_BYTES * 3]);
        split.finish();
        let got = lines(&mut rx);
        assert_eq!(got[..2], ["one".to_string(), "two".to_string()]);
        assert!(got[2].ends_with("[line cut]"));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn drops_and_counts_lines_over_the_budget() {
        let (tx, mut rx) = mpsc::channel(10_000);
        let reporter = Reporter::new(0, 1, tx);
        for _ in 0..MAX_LINES_PER_ATTEMPT + 5 {
            reporter.log(LogStream::Stderr, b"line");
        }
        assert_eq!(lines(&mut rx).len() as u64, MAX_LINES_PER_ATTEMPT);
        assert_eq!(reporter.dropped(), 5);
    }

    #[test]
    fn a_full_channel_drops_instead_of_blocking() {
        let (tx, _rx) = mpsc::channel(2);
        let reporter = Reporter::new(0, 1, tx);
        for _ in 0..5 {
            reporter.log(LogStream::Stdout, b"x");
        }
        assert_eq!(reporter.dropped(), 3);
    }
}
