//! What the chat prints, and where.
//!
//! On a terminal everything goes through the line editor's external
//! printer, which clears the prompt and the line being typed, prints above
//! them and draws them again: the typed line and the streamed reply never
//! share a row. The reply's unfinished line is printed as a row of its own
//! right above the prompt and rewritten in place as deltas arrive
//! ([`Screen`] computes those rewrites; it does no I/O, so it is tested
//! alone). Without a terminal, replies go to stdout and everything else to
//! stderr, one line at a time.
//!
//! A known limit of the editor (rustyline 18, upstream issue
//! kkawakam/rustyline#976): once an external printer exists, bytes that
//! arrive in one read outside a bracketed paste (an input method's commit,
//! keys sent by a script) are taken one per input event, so the rest show
//! at the next key. Typing and bracketed pastes are not affected.
//!
//! Agent and user text is shown as text: control characters (escape
//! sequences included) are replaced, so an agent cannot move the cursor or
//! recolour the terminal.

use std::io::Write;
use std::sync::{Arc, Mutex};

use unicode_width::UnicodeWidthStr;

/// The prompt, and the label of the user's messages in the transcript.
pub const YOU: &str = "you> ";
/// The label of the agent's replies.
pub const AGENT: &str = "agent> ";
/// The label of messages another client posted to the session.
pub const OTHER: &str = "other> ";

/// `text` with every control character but the newline made visible, so it
/// cannot drive the terminal (a tab becomes spaces, a carriage return goes).
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push('\n'),
            '\t' => out.push_str("    "),
            '\r' => {}
            c if c.is_control() => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// `text` labelled: the label on its first line, later lines indented to
/// line up under it.
pub fn labelled(label: &str, text: &str) -> String {
    let indent = " ".repeat(label.width());
    sanitize(text)
        .split('\n')
        .enumerate()
        .map(|(i, line)| {
            let lead = if i == 0 { label } else { indent.as_str() };
            format!("{lead}{line}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The reply being streamed.
#[derive(Debug)]
struct Reply {
    turn: String,
    /// Every delta so far, as received: compared with the stored message
    /// to tell whether the screen already shows all of it.
    streamed: String,
    /// The reply's unfinished line (sanitized).
    line: String,
    /// Whether `line` is the reply's first (it carries the label).
    first: bool,
}

/// The rows above the prompt, as text to hand the external printer. A
/// message ends with a newline; the printer draws the prompt below it.
#[derive(Debug)]
pub struct Screen {
    /// The terminal's width in columns.
    width: usize,
    reply: Option<Reply>,
    /// How many rows the reply's unfinished line takes right above the
    /// prompt (0: it is not there, nothing to rewrite).
    live_rows: usize,
}

impl Screen {
    pub fn new(width: usize) -> Self {
        Self {
            width: width.max(1),
            reply: None,
            live_rows: 0,
        }
    }

    pub fn set_width(&mut self, width: usize) {
        self.width = width.max(1);
    }

    fn rows(&self, text: &str) -> usize {
        text.width().div_ceil(self.width).max(1)
    }

    /// Moves up over the live rows and clears from there down.
    fn unprint_live(&mut self, out: &mut String) {
        if self.live_rows > 0 {
            out.push_str(&format!("\x1b[{}A\r\x1b[J", self.live_rows));
            self.live_rows = 0;
        }
    }

    fn render(reply: &Reply) -> String {
        let label = if reply.first { AGENT } else { "" };
        let indent = if reply.first {
            String::new()
        } else {
            " ".repeat(AGENT.width())
        };
        format!("{label}{indent}{}", reply.line)
    }

    /// Prints the reply's unfinished line as the live row, if it has text
    /// (or is the reply's first line: the label shows the agent started).
    fn print_live(&mut self, out: &mut String) {
        if let Some(reply) = &self.reply {
            if reply.first || !reply.line.is_empty() {
                let row = Self::render(reply);
                self.live_rows = self.rows(&row);
                out.push_str(&row);
                out.push('\n');
            }
        }
    }

    /// A delta of `turn`'s reply.
    pub fn delta(&mut self, turn: &str, text: &str) -> String {
        let mut out = String::new();
        if self.reply.as_ref().is_some_and(|r| r.turn != turn) {
            self.end_reply();
        }
        self.unprint_live(&mut out);
        let reply = self.reply.get_or_insert_with(|| Reply {
            turn: turn.to_owned(),
            streamed: String::new(),
            line: String::new(),
            first: true,
        });
        reply.streamed.push_str(text);
        for (i, part) in sanitize(text).split('\n').enumerate() {
            if i > 0 {
                out.push_str(&Self::render(reply));
                out.push('\n');
                reply.line.clear();
                reply.first = false;
            }
            reply.line.push_str(part);
        }
        self.print_live(&mut out);
        out
    }

    /// `turn`'s stored reply: nothing to print if the deltas showed all of
    /// it, else the whole of it (deltas were missed while reconnecting).
    pub fn reply(&mut self, turn: &str, content: &str) -> String {
        let shown = self
            .reply
            .as_ref()
            .is_some_and(|r| r.turn == turn && r.streamed == content);
        if shown {
            self.end_reply();
            return String::new();
        }
        let mut out = String::new();
        let live = self.live_rows > 0;
        self.unprint_live(&mut out);
        if self.reply.as_ref().is_some_and(|r| r.turn == turn) {
            // The stored reply replaces what was streamed of it.
            self.reply = None;
        }
        out.push_str(&labelled(AGENT, content));
        out.push('\n');
        if live {
            self.print_live(&mut out);
        }
        out
    }

    /// The reply ends where it is (its turn ended without a stored message,
    /// or another reply starts): its row stays as shown.
    pub fn end_reply(&mut self) {
        self.reply = None;
        self.live_rows = 0;
    }

    /// Ends `turn`'s reply, if it is the one streaming.
    pub fn end_turn(&mut self, turn: &str) {
        if self.reply.as_ref().is_some_and(|r| r.turn == turn) {
            self.end_reply();
        }
    }

    /// Lines printed above the live row, which stays right above the prompt.
    pub fn note(&mut self, text: &str) -> String {
        let mut out = String::new();
        let live = self.live_rows > 0;
        self.unprint_live(&mut out);
        out.push_str(text);
        out.push('\n');
        // A reply line the user's entered line cut off goes on at its next
        // delta, not at every note.
        if live {
            self.print_live(&mut out);
        }
        out
    }

    /// The user entered a line: the prompt row moved down with it, so the
    /// live row is no longer right above the prompt.
    pub fn detach(&mut self) {
        self.live_rows = 0;
    }
}

/// A terminal: the screen's state and the printer that draws above the
/// prompt. Shared with the thread that reads the typed lines.
pub struct Terminal {
    pub screen: Screen,
    printer: Box<dyn rustyline::ExternalPrinter + Send>,
}

impl Terminal {
    pub fn new(width: usize, printer: Box<dyn rustyline::ExternalPrinter + Send>) -> Self {
        Self {
            screen: Screen::new(width),
            printer,
        }
    }

    fn print(&mut self, text: String) {
        if !text.is_empty() {
            // A terminal that cannot be written to leaves nothing to tell.
            let _ = self.printer.print(text);
        }
    }
}

/// Where the chat's output goes.
#[derive(Clone)]
pub enum Out {
    Terminal(Arc<Mutex<Terminal>>),
    /// Replies to stdout, everything else to stderr.
    Plain,
}

impl Out {
    fn with<R>(t: &Arc<Mutex<Terminal>>, f: impl FnOnce(&mut Terminal) -> R) -> R {
        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut t)
    }

    /// A line of the transcript or a status (already sanitized and labelled).
    pub fn note(&self, text: &str) {
        match self {
            Self::Terminal(t) => Self::with(t, |t| {
                let msg = t.screen.note(text);
                t.print(msg)
            }),
            Self::Plain => eprintln!("{text}"),
        }
    }

    /// A status: `[text]`.
    pub fn status(&self, text: &str) {
        self.note(&format!("[{}]", sanitize(text)));
    }

    /// A delta of `turn`'s reply (shown on a terminal only: without one,
    /// the stored reply is printed whole).
    pub fn delta(&self, turn: &str, text: &str) {
        if let Self::Terminal(t) = self {
            Self::with(t, |t| {
                let msg = t.screen.delta(turn, text);
                t.print(msg)
            })
        }
    }

    /// `turn`'s stored reply.
    pub fn reply(&self, turn: &str, content: &str) {
        match self {
            Self::Terminal(t) => Self::with(t, |t| {
                let msg = t.screen.reply(turn, content);
                t.print(msg)
            }),
            Self::Plain => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}", sanitize(content));
                let _ = out.flush();
            }
        }
    }

    /// `turn` ended: its reply, if one streams, stays as shown.
    pub fn end_turn(&self, turn: &str) {
        if let Self::Terminal(t) = self {
            Self::with(t, |t| t.screen.end_turn(turn))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        assert_eq!(
            sanitize("a\x1b[2Jb\r\nc\td\u{7}"),
            "a\u{FFFD}[2Jb\nc    d\u{FFFD}"
        );
    }

    #[test]
    fn later_lines_line_up_under_the_label() {
        assert_eq!(labelled(AGENT, "one\ntwo"), "agent> one\n       two");
    }

    #[test]
    fn a_streamed_line_is_rewritten_in_place() {
        let mut s = Screen::new(80);
        assert_eq!(s.delta("t", "echo:"), "agent> echo:\n");
        assert_eq!(s.delta("t", " hi"), "\x1b[1A\r\x1b[Jagent> echo: hi\n");
        // A new line finishes the row and starts another.
        assert_eq!(
            s.delta("t", "\nmore"),
            "\x1b[1A\r\x1b[Jagent> echo: hi\n       more\n"
        );
        // A status goes above the live row, which is drawn again below it.
        assert_eq!(
            s.note("[queued: position 1]"),
            "\x1b[1A\r\x1b[J[queued: position 1]\n       more\n"
        );
        // Everything was streamed: the stored reply adds nothing.
        assert_eq!(s.reply("t", "echo: hi\nmore"), "");
        assert_eq!(s.note("[turn completed]"), "[turn completed]\n");
    }

    #[test]
    fn a_live_row_wider_than_the_terminal_is_rewritten_whole() {
        let mut s = Screen::new(10);
        s.delta("t", "0123456789abc");
        assert!(s.delta("t", "d").starts_with("\x1b[2A\r\x1b[J"));
    }

    #[test]
    fn after_an_entered_line_the_reply_goes_on_below_it() {
        let mut s = Screen::new(80);
        s.delta("t", "echo:");
        s.detach();
        assert_eq!(s.note("[cancelling…]"), "[cancelling…]\n");
        assert_eq!(s.delta("t", " hi"), "agent> echo: hi\n");
    }

    #[test]
    fn a_reply_whose_deltas_were_missed_is_printed_whole() {
        let mut s = Screen::new(80);
        s.delta("t", "echo:");
        assert_eq!(s.reply("t", "echo: hi"), "\x1b[1A\r\x1b[Jagent> echo: hi\n");
        assert_eq!(s.reply("u", "line\nnext"), "agent> line\n       next\n");
    }
}
