//! Streaming detokenization, the one used by every front end (CLI, server, browser): the
//! text of the generated ids, cut before the first stop string, released in pieces that never
//! split a UTF-8 character and never show the start of a stop string before it is known
//! not to be one.

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// The text of a growing token sequence, released piece by piece.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    stops: Vec<String>,
    ids: Vec<u32>,
    text: String,
    emitted: usize,
    stopped: bool,
}

impl TextStream {
    /// A stream that ends at the first of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        TextStream {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Default::default()
        }
    }

    /// Adds a generated token; returns the text that is now certain to belong to the answer
    /// (possibly empty). After a stop string appears, [`Self::stopped`] is true and the text
    /// ends before it.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        self.text = tokenizer.decode(&self.ids, true)?;
        if let Some(cut) = self
            .stops
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            self.stopped = true;
            return Ok(self.release(self.text.len()));
        }
        // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes, and
        // a tail that may be the start of a stop string until the next tokens decide.
        let settled = self.text.trim_end_matches('\u{FFFD}');
        let stable = settled.len() - stop_prefix_len(settled, &self.stops);
        Ok(self.release(stable))
    }

    /// Ends the stream: releases whatever was held back.
    pub fn finish(&mut self) -> String {
        self.release(self.text.len())
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The whole text so far (cut before a stop string), released or not.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Takes the whole text.
    pub fn into_text(self) -> String {
        self.text
    }

    fn release(&mut self, upto: usize) -> String {
        if upto <= self.emitted || !self.text.is_char_boundary(self.emitted) {
            return String::new();
        }
        let piece = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        piece
    }
}

/// The length of the longest tail of `text` that is a proper prefix of one of `stops`.
fn stop_prefix_len(text: &str, stops: &[String]) -> usize {
    stops
        .iter()
        .filter_map(|stop| {
            (1..stop.len())
                .rev()
                .filter(|&k| stop.is_char_boundary(k))
                .find(|&k| text.ends_with(&stop[..k]))
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prefix_is_the_longest_proper_prefix_at_the_end() {
        let stops = ["END".to_string(), "éx".to_string()];
        assert_eq!(stop_prefix_len("abc", &stops), 0);
        assert_eq!(stop_prefix_len("abcE", &stops), 1);
        assert_eq!(stop_prefix_len("abcEN", &stops), 2);
        // A whole stop string is not a proper prefix (the caller cuts it instead).
        assert_eq!(stop_prefix_len("abcEND", &stops), 0);
        assert_eq!(stop_prefix_len("aé", &stops), "é".len());
    }
}
