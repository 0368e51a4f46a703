//! Function calling (`tools`, `tool_choice`): the definitions go to the chat template (or,
//! for a template that does not render them, into a system message); a call is written
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, forced by a grammar when
//! `tool_choice` is `required` or names a function (its arguments then hold only the
//! properties their schema names, unless the schema sets `additionalProperties`), and read
//! back out of the text into OpenAI's `tool_calls`.

use serde_json::{json, Value};

use super::api::ApiError;
use crate::engine::grammar::GrammarSpec;
use crate::tokenizer::ChatMessage;

/// Most tools one request may define.
pub const MAX_TOOLS: usize = 128;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// How the model may use the tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    /// Never: plain text (the tools are not shown to the model).
    None,
    /// Text or a call, as the model decides.
    Auto,
    /// A call to one of the tools.
    Required,
    /// A call to this tool.
    Named(String),
}

/// One function the model may call.
#[derive(Debug, Clone)]
struct Function {
    name: String,
    /// Its arguments' JSON schema.
    parameters: Value,
}

/// A chat request's tools.
#[derive(Debug, Clone)]
pub struct Tools {
    /// The definitions as the request gave them (what the chat template receives).
    pub defs: Vec<Value>,
    functions: Vec<Function>,
    /// How they may be used.
    pub choice: ToolChoice,
    /// Whether a response may hold several calls (`parallel_tool_calls`; else the first).
    pub parallel: bool,
}

/// One call read out of the generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// The function.
    pub name: String,
    /// Its arguments as JSON text.
    pub arguments: String,
}

fn invalid(param: &'static str, msg: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param), msg)
}

fn valid_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Reads `tools`, `tool_choice` and `parallel_tool_calls` (None: the request has no tools and
/// does not force any).
pub fn parse(
    tools: Option<&Value>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, ApiError> {
    let defs = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err(invalid("tools", "tools must be a list")),
    };
    if defs.len() > MAX_TOOLS {
        return Err(invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools per request"),
        ));
    }
    let mut functions = Vec::with_capacity(defs.len());
    for (i, d) in defs.iter().enumerate() {
        if d["type"] != "function" {
            return Err(invalid(
                "tools",
                format!("tools[{i}].type must be `function`"),
            ));
        }
        let f = &d["function"];
        let name = f["name"]
            .as_str()
            .filter(|n| valid_name(n))
            .ok_or_else(|| {
                invalid(
                    "tools",
                    format!("tools[{i}].function.name must be 1 to 64 of [A-Za-z0-9_-]"),
                )
            })?;
        if functions.iter().any(|g: &Function| g.name == name) {
            return Err(invalid(
                "tools",
                format!("tools[{i}]: the name `{name}` is used twice"),
            ));
        }
        let parameters = match &f["parameters"] {
            Value::Null => json!({ "type": "object", "properties": {} }),
            p @ Value::Object(_) => p.clone(),
            _ => {
                return Err(invalid(
                    "tools",
                    format!("tools[{i}].function.parameters must be a JSON schema object"),
                ))
            }
        };
        functions.push(Function {
            name: name.to_string(),
            parameters,
        });
    }
    let choice = match choice {
        None | Some(Value::Null) if functions.is_empty() => return Ok(None),
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            _ => {
                return Err(invalid(
                    "tool_choice",
                    "tool_choice must be none, auto, required or a function",
                ))
            }
        },
        Some(v) if v["type"] == "function" => {
            let name = v["function"]["name"].as_str().unwrap_or_default();
            ToolChoice::Named(name.to_string())
        }
        Some(_) => {
            return Err(invalid(
                "tool_choice",
                "tool_choice must be none, auto, required or {\"type\": \"function\", ...}",
            ))
        }
    };
    match &choice {
        ToolChoice::None | ToolChoice::Auto if functions.is_empty() => return Ok(None),
        ToolChoice::Required if functions.is_empty() => {
            return Err(invalid("tool_choice", "tool_choice required needs tools"))
        }
        ToolChoice::Named(n) if !functions.iter().any(|f| f.name == *n) => {
            return Err(invalid(
                "tool_choice",
                format!("tool_choice names `{n}`, which is not among the tools"),
            ))
        }
        _ => {}
    }
    Ok(Some(Tools {
        defs,
        functions,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

impl Tools {
    /// Whether the model sees the tools and its text is read for calls.
    pub fn active(&self) -> bool {
        self.choice != ToolChoice::None
    }

    /// The functions a call may name.
    fn callable(&self) -> impl Iterator<Item = &Function> {
        self.functions.iter().filter(move |f| match &self.choice {
            ToolChoice::Named(n) => f.name == *n,
            _ => true,
        })
    }

    /// The grammar that forces one call (`required` or a named function); None otherwise.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        if !matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_)) {
            return None;
        }
        let calls: Vec<Value> = self
            .callable()
            .map(|f| {
                // The arguments hold only the properties their schema names, unless it
                // says otherwise (JSON schema's default would let a model invent keys).
                let mut arguments = f.parameters.clone();
                if let Some(o) = arguments.as_object_mut() {
                    o.entry("additionalProperties")
                        .or_insert(Value::Bool(false));
                }
                json!({
                    "type": "object",
                    "properties": { "name": { "const": f.name }, "arguments": arguments },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "anyOf": calls,
            "x-guidance": { "whitespace_flexible": false },
        });
        Some(GrammarSpec::Lark(format!(
            "start: \"{OPEN}\" call \"{CLOSE}\"\ncall: %json {schema}\n"
        )))
    }

    /// How a call is written, for templates that do not render `tools` themselves.
    pub fn system_prompt(&self) -> String {
        let defs: Vec<Value> = self
            .callable()
            .map(|f| json!({ "name": f.name, "parameters": f.parameters }))
            .collect();
        format!(
            "You can call these functions:\n<tools>{}</tools>\nTo call one, answer with \
             {OPEN}{{\"name\": NAME, \"arguments\": {{...}}}}{CLOSE}",
            Value::from(defs)
        )
    }

    /// Splits generated `text` into its content (None when only calls) and the calls to known
    /// functions it writes; text that is not a well-formed call stays content.
    pub fn read_calls(&self, text: &str) -> (Option<String>, Vec<ToolCall>) {
        let mut content = String::new();
        let mut calls = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find(OPEN) {
            let after = &rest[at + OPEN.len()..];
            let Some(end) = after.find(CLOSE) else { break };
            match self.call(after[..end].trim()) {
                Some(c) => {
                    content.push_str(&rest[..at]);
                    calls.push(c);
                }
                None => content.push_str(&rest[..at + OPEN.len() + end + CLOSE.len()]),
            }
            rest = &after[end + CLOSE.len()..];
        }
        content.push_str(rest);
        if !self.parallel {
            calls.truncate(1);
        }
        let content = if calls.is_empty() {
            Some(content)
        } else {
            Some(content.trim().to_string()).filter(|c| !c.is_empty())
        };
        (content, calls)
    }

    fn call(&self, json_text: &str) -> Option<ToolCall> {
        let v: Value = serde_json::from_str(json_text).ok()?;
        let name = v["name"].as_str()?;
        self.callable().find(|f| f.name == name)?;
        let arguments = match &v["arguments"] {
            Value::Null => "{}".to_string(),
            Value::String(s) => s.clone(),
            a => a.to_string(),
        };
        Some(ToolCall {
            name: name.to_string(),
            arguments,
        })
    }
}

/// `messages` ready for the chat template: a template that does not render `tools` gets
/// earlier calls as the text the model wrote, and the active tools in a system message.
pub fn prepare(messages: &mut Vec<ChatMessage>, tools: Option<&Tools>, template_takes_tools: bool) {
    if template_takes_tools {
        return;
    }
    for m in messages.iter_mut() {
        if let Some(calls) = m.tool_calls.take() {
            m.content.push_str(&calls_text(&calls));
        }
    }
    let Some(tools) = tools.filter(|t| t.active()) else {
        return;
    };
    let prompt = tools.system_prompt();
    match messages.first_mut().filter(|m| m.role == "system") {
        Some(m) => m.content = format!("{}\n\n{prompt}", m.content),
        None => messages.insert(0, ChatMessage::new("system", &prompt)),
    }
}

/// An assistant message's `tool_calls` written as the model would write them.
fn calls_text(calls: &Value) -> String {
    calls
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let f = &c["function"];
            let args = match &f["arguments"] {
                Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
                a => a.clone(),
            };
            format!(
                "{OPEN}{{\"name\": {}, \"arguments\": {args}}}{CLOSE}",
                f["name"]
            )
        })
        .collect()
}

/// OpenAI's `tool_calls` for `calls`, ids made from `id` (the response's).
pub fn calls_json(id: &str, choice: usize, calls: &[ToolCall]) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "id": format!("call-{id}-{choice}-{i}"),
                "type": "function",
                "function": { "name": c.name, "arguments": c.arguments },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tools {
        let tools = json!([
            {"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}},
            {"type": "function", "function": {"name": "add"}},
        ]);
        parse(Some(&tools), None, None).unwrap().unwrap()
    }

    #[test]
    fn calls_are_read_out_of_the_text_and_the_rest_stays_content() {
        let t = weather();
        assert_eq!(t.choice, ToolChoice::Auto);
        let text = "Let me look. <tool_call>{\"name\": \"get_weather\", \"arguments\": \
                    {\"city\": \"Oslo\"}}</tool_call><tool_call>{\"name\": \"add\"}</tool_call>";
        let (content, calls) = t.read_calls(text);
        assert_eq!(content.as_deref(), Some("Let me look."));
        assert_eq!(
            calls,
            [
                ToolCall {
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Oslo"}"#.into()
                },
                ToolCall {
                    name: "add".into(),
                    arguments: "{}".into()
                }
            ]
        );
        let mut single = t.clone();
        single.parallel = false;
        assert_eq!(single.read_calls(text).1.len(), 1);
        // Unknown names, broken JSON and unclosed calls stay text.
        for text in [
            "<tool_call>{\"name\": \"rm\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": </tool_call>",
            "<tool_call>{\"name\": \"add\"}",
        ] {
            assert_eq!(t.read_calls(text), (Some(text.to_string()), vec![]));
        }
    }

    #[test]
    fn choices_and_definitions_are_checked() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        assert!(parse(None, Some(&json!("none")), None).unwrap().is_none());
        assert!(parse(None, Some(&json!("required")), None).is_err());
        let bad = [
            (json!([{"type": "code"}]), json!("auto")),
            (
                json!([{"type": "function", "function": {"name": "a b"}}]),
                json!("auto"),
            ),
            (
                json!([{"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {"name": "f"}}]),
                json!("auto"),
            ),
            (
                tools.clone(),
                json!({"type": "function", "function": {"name": "g"}}),
            ),
            (tools.clone(), json!("sometimes")),
        ];
        for (t, c) in bad {
            assert!(parse(Some(&t), Some(&c), None).is_err(), "{t} {c}");
        }
        let named = parse(
            Some(&tools),
            Some(&json!({"type": "function", "function": {"name": "f"}})),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(named.choice, ToolChoice::Named("f".into()));
        assert!(named.grammar().is_some());
        assert!(weather().grammar().is_none());
    }

    #[test]
    fn templates_without_tools_get_them_in_the_system_message() {
        let t = weather();
        let mut m = vec![ChatMessage::new("user", "hi")];
        prepare(&mut m, Some(&t), false);
        assert_eq!(m[0].role, "system");
        assert!(m[0].content.contains("get_weather"));
        let mut m = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "hi"),
        ];
        prepare(&mut m, Some(&t), false);
        assert!(m[0].content.starts_with("Be brief.") && m[0].content.contains("<tools>"));
        let mut m = vec![ChatMessage::new("user", "hi")];
        prepare(&mut m, Some(&t), true);
        assert_eq!(m.len(), 1);
        // Earlier calls become the text the model wrote.
        let mut m = vec![ChatMessage {
            tool_calls: Some(json!([{"type": "function", "id": "c1",
                "function": {"name": "add", "arguments": "{\"a\": 1}"}}])),
            ..ChatMessage::new("assistant", "")
        }];
        prepare(&mut m, None, false);
        assert_eq!(
            m[0].content,
            r#"<tool_call>{"name": "add", "arguments": {"a":1}}</tool_call>"#
        );
        assert!(m[0].tool_calls.is_none());
    }
}
