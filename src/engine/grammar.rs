//! Constrained decoding: a JSON schema, "any JSON object", a Lark grammar or a regex compiled
//! by llguidance against the model's vocabulary into a per-step token mask, which the sampler
//! applies before it picks each token ([`crate::engine::sampler::Sampler::constrain`]).

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// What generated text must match.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this schema (`{"type": "json_schema", ...}`).
    JsonSchema(Value),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
    /// A regular expression.
    Regex(String),
}

impl GrammarSpec {
    fn top_level(&self) -> TopLevelGrammar {
        // JSON in the compact layout (`, ` and `: `, no free whitespace) unless the schema asks
        // for another through llguidance's `x-guidance` options: a small model left free to
        // pad with whitespace may spend its whole budget on it.
        let compact = |mut s: Value| {
            if let Some(o) = s.as_object_mut() {
                o.entry("x-guidance")
                    .or_insert_with(|| serde_json::json!({ "whitespace_flexible": false }));
            }
            TopLevelGrammar::from_json_schema(s)
        };
        match self {
            GrammarSpec::JsonObject => compact(serde_json::json!({ "type": "object" })),
            GrammarSpec::JsonSchema(s) => compact(s.clone()),
            GrammarSpec::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            GrammarSpec::Regex(r) => TopLevelGrammar::from_regex(r),
        }
    }
}

/// The model's vocabulary as llguidance sees it (built once per model; cheap to share).
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        // Greedy over the trie when the tokenizer cannot take the text.
        self.tokenizer
            .encode(&text, false)
            .unwrap_or_else(|_| self.trie.greedy_tokenize(s))
    }
}

/// Compiles grammars for one model.
#[derive(Clone)]
pub struct Grammars {
    factory: Arc<ParserFactory>,
    eos: u32,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("eos", &self.eos).finish()
    }
}

impl Grammars {
    /// The grammar compiler of a model with `vocab` ids whose generation ends with `eos`.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize, eos: u32) -> Result<Self> {
        let words = tokenizer.token_bytes(vocab, TokTrie::SPECIAL_TOKEN_MARKER)?;
        let info = TokRxInfo::new(vocab as u32, eos);
        let env: TokEnv = Arc::new(Vocabulary {
            trie: TokTrie::from(&info, &words),
            tokenizer,
        });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| Error::Tokenizer(format!("grammar vocabulary: {e}")))?;
        factory.set_stderr_log_level(0);
        Ok(Grammars {
            factory: Arc::new(factory),
            eos,
        })
    }

    /// The token that ends a constrained generation.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// A fresh constraint for `spec`; a grammar that does not compile is a request error that
    /// says why.
    pub fn constraint(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let parser = self
            .factory
            .create_parser(spec.top_level())
            .map_err(|e| Error::Request(format!("the grammar does not compile: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(Error::Request(format!("the grammar does not compile: {e}")));
        }
        Ok(Constraint {
            matcher,
            eos: self.eos,
            next: None,
        })
    }
}

/// One generation's constraint: which tokens may come next, advanced token by token.
pub struct Constraint {
    matcher: Matcher,
    eos: u32,
    /// The next token's mask, computed ahead ([`Constraint::prefetch`]; None inside: only the
    /// end token), dropped when a token is committed.
    next: Option<Option<SimpleVob>>,
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        self.fork()
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("eos", &self.eos)
            .finish()
    }
}

impl Constraint {
    /// Computes the next token's mask now (the scheduler does it for every constrained
    /// sequence while the device runs the step), so [`Constraint::mask`] only applies it.
    pub fn prefetch(&mut self) {
        if self.next.is_none() {
            self.next = Some(self.matcher.compute_mask_or_eos().ok());
        }
    }

    /// Sets every logit the grammar forbids next to −∞. Once the text is complete (or the
    /// matcher failed) only the end token remains.
    pub fn mask(&mut self, logits: &mut [f32]) {
        self.prefetch();
        match self.next.as_ref().and_then(Option::as_ref) {
            Some(allowed) => {
                // 32 tokens a word: whole words allowed or forbidden go at once.
                let words = allowed.as_slice();
                for (w, chunk) in logits.chunks_mut(32).enumerate() {
                    match words.get(w).copied().unwrap_or(0) {
                        u32::MAX => {}
                        0 => chunk.fill(f32::NEG_INFINITY),
                        bits => {
                            for (b, l) in chunk.iter_mut().enumerate() {
                                if bits & (1 << b) == 0 {
                                    *l = f32::NEG_INFINITY;
                                }
                            }
                        }
                    }
                }
            }
            None => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if i != self.eos as usize {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// Advances past `token` (a token the mask allowed).
    pub fn commit(&mut self, token: u32) {
        self.next = None;
        if token != self.eos || !self.matcher.is_stopped() {
            // An error stops the matcher: the next mask then allows only the end token.
            let _ = self.matcher.consume_token(token);
        }
    }

    /// An independent copy in the same state (one compile for a request's `n` choices).
    pub fn fork(&self) -> Constraint {
        Constraint {
            matcher: self.matcher.deep_clone(),
            eos: self.eos,
            next: self.next.clone(),
        }
    }

    /// Whether the text so far is complete (the grammar accepts it and allows nothing more).
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Arc<Tokenizer> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        Arc::new(Tokenizer::from_dir(&dir).unwrap().unwrap())
    }

    #[test]
    fn token_bytes_spell_the_encoded_text() {
        let tok = fixture();
        let words = tok.token_bytes(300, TokTrie::SPECIAL_TOKEN_MARKER).unwrap();
        let text = "Hello, w\u{f6}rld! {\"a\": [1, 2.5]}\n\ttabs";
        let ids = tok.encode(text, false).unwrap();
        let spelled: Vec<u8> = ids
            .iter()
            .flat_map(|&i| words[i as usize].clone())
            .collect();
        assert_eq!(String::from_utf8(spelled).unwrap(), text);
    }

    #[test]
    fn a_constraint_masks_everything_but_the_grammars_continuations() {
        let tok = fixture();
        let g = Grammars::new(tok.clone(), 300, 2).unwrap();
        let mut c = g
            .constraint(&GrammarSpec::Regex("ab{2,3}c".into()))
            .unwrap();
        let words = tok.token_bytes(300, TokTrie::SPECIAL_TOKEN_MARKER).unwrap();
        // Greedy over a mask: always the lowest allowed id (all logits equal).
        let mut out = Vec::new();
        for _ in 0..20 {
            let mut l = vec![0.0f32; 300];
            c.mask(&mut l);
            let t = l.iter().position(|x| x.is_finite()).unwrap() as u32;
            if t == 2 {
                break;
            }
            out.extend_from_slice(&words[t as usize]);
            c.commit(t);
        }
        let s = String::from_utf8(out).unwrap();
        assert!(s == "abbc" || s == "abbbc", "{s}");
        assert!(c.is_done());
        let bad = g.constraint(&GrammarSpec::Lark("start: (".into()));
        assert!(bad.unwrap_err().to_string().contains("does not compile"));
    }
}
