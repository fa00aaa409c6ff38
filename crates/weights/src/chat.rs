//! Chat messages and the model's own Jinja chat template, rendered as transformers'
//! `apply_chat_template` renders it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{Result, WeightsError};

/// Roles the Qwen2 chat template renders.
pub const VALID_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// Creates a message with the given role and content (the role is checked when the chat is
    /// rendered).
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// Creates a `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// Creates a `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// Creates an `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Checks that `messages` is non-empty and uses only [`VALID_ROLES`].
pub fn validate_messages(messages: &[ChatMessage]) -> Result<()> {
    validate_messages_from(messages, None)
}

fn validate_messages_from(messages: &[ChatMessage], source_name: Option<&Path>) -> Result<()> {
    let invalid = |message: String| WeightsError::InvalidChat {
        source_name: source_name.map(Path::to_path_buf),
        message,
    };
    if messages.is_empty() {
        return Err(invalid(
            "the chat has no messages; give at least one {\"role\": \"user\", \"content\": ...}"
                .into(),
        ));
    }
    for (index, message) in messages.iter().enumerate() {
        if !VALID_ROLES.contains(&message.role.as_str()) {
            return Err(invalid(format!(
                "message {index} has unknown role {:?}; valid roles are {}",
                message.role,
                VALID_ROLES.join(", ")
            )));
        }
    }
    Ok(())
}

/// Parses a JSON list of `{"role": ..., "content": ...}` objects and checks the roles.
pub fn parse_chat_json(text: &str) -> Result<Vec<ChatMessage>> {
    parse_chat_json_from(text, None)
}

/// Reads a chat file (a JSON list of `{"role": ..., "content": ...}` objects).
pub fn read_chat_file(path: impl AsRef<Path>) -> Result<Vec<ChatMessage>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|error| WeightsError::io(path, error))?;
    // Windows editors often start UTF-8 files with a byte order mark, which JSON does not allow.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    parse_chat_json_from(text, Some(path))
}

fn parse_chat_json_from(text: &str, source_name: Option<&Path>) -> Result<Vec<ChatMessage>> {
    let invalid = |message: String| WeightsError::InvalidChat {
        source_name: source_name.map(Path::to_path_buf),
        message,
    };
    let expected = "expected a JSON list of {\"role\": ..., \"content\": ...} objects";

    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|error| invalid(format!("not valid JSON ({error}); {expected}")))?;
    let serde_json::Value::Array(items) = value else {
        return Err(invalid(format!(
            "found {} at the top level; {expected}",
            json_kind(&value)
        )));
    };

    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let serde_json::Value::Object(object) = item else {
            return Err(invalid(format!(
                "message {index} is {}; {expected}",
                json_kind(item)
            )));
        };
        let field = |key: &str| -> Result<String> {
            match object.get(key) {
                Some(serde_json::Value::String(text)) => Ok(text.clone()),
                Some(other) => Err(invalid(format!(
                    "message {index}: \"{key}\" is {}, expected a string",
                    json_kind(other)
                ))),
                None => Err(invalid(format!("message {index} has no \"{key}\" field"))),
            }
        };
        let role = field("role")?;
        let content = field("content")?;
        for key in object.keys() {
            if key != "role" && key != "content" {
                tracing::warn!(index, key = %key, "chat message field ignored");
            }
        }
        messages.push(ChatMessage { role, content });
    }

    validate_messages_from(&messages, source_name)?;
    Ok(messages)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The chat template of a tokenizer and the special tokens it may refer to.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// `tokenizer_config.json` (or `chat_template.jinja`), for error messages.
    path: PathBuf,
    /// `bos_token`, `eos_token`, ... as transformers passes them to the template.
    special_tokens: Vec<(String, Option<String>)>,
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    /// Reads the template from the `tokenizer_config.json` value `config` (at `path`), falling back
    /// to a `chat_template.jinja` file beside it, as transformers 5 saves it. Returns `None` when
    /// neither has a template.
    pub fn from_tokenizer_config(config: &serde_json::Value, path: &Path) -> Result<Option<Self>> {
        let error = |message: String| WeightsError::ChatTemplate {
            path: path.to_path_buf(),
            message,
        };

        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => {
                let jinja = path.with_file_name("chat_template.jinja");
                match std::fs::read_to_string(&jinja) {
                    Ok(text) => Some((text, jinja)),
                    Err(_) => None,
                }
            }
            Some(serde_json::Value::String(text)) => Some((text.clone(), path.to_path_buf())),
            // Older configs store a list of named templates; transformers uses the one named
            // "default".
            Some(serde_json::Value::Array(named)) => {
                let default = named.iter().find(|entry| entry["name"] == "default");
                match default.and_then(|entry| entry["template"].as_str()) {
                    Some(text) => Some((text.to_string(), path.to_path_buf())),
                    None => {
                        return Err(error(
                            "chat_template is a list without an entry named \"default\"".into(),
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(error(format!(
                    "chat_template is {}, expected a string",
                    json_kind(other)
                )));
            }
        };
        let Some((source, path)) = source else {
            return Ok(None);
        };

        let special_tokens = [
            "bos_token",
            "eos_token",
            "unk_token",
            "pad_token",
            "sep_token",
            "cls_token",
            "mask_token",
        ]
        .into_iter()
        .map(|key| (key.to_string(), special_token_text(config.get(key))))
        .collect();

        let mut env = template_environment();
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|error| WeightsError::ChatTemplate {
                path: path.clone(),
                message: format!("the template does not compile: {error:#}"),
            })?;
        Ok(Some(Self {
            env,
            path,
            special_tokens,
        }))
    }

    /// Renders `messages`, appending the assistant header when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        validate_messages(messages)?;

        let mut context: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(key, text)| {
                (
                    key.clone(),
                    text.as_deref().map_or(Value::from(()), Value::from),
                )
            })
            .collect();
        context.push((
            "messages".into(),
            Value::from(minijinja::value::Serde(messages)),
        ));
        context.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        context.push(("tools".into(), Value::from(())));
        context.push(("documents".into(), Value::from(())));
        let context = Value::from(context.into_iter().collect::<BTreeMap<String, Value>>());

        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| self.error(error))?;
        template.render(context).map_err(|error| self.error(error))
    }

    fn error(&self, error: minijinja::Error) -> WeightsError {
        let message = if error.kind() == ErrorKind::OutOfFuel {
            format!(
                "rendering stopped after {TEMPLATE_FUEL} steps, far more than a chat template \
                 needs; check chat_template for a loop that runs too long ({error})"
            )
        } else {
            format!("rendering failed: {error:#}")
        };
        WeightsError::ChatTemplate {
            path: self.path.clone(),
            message,
        }
    }
}

/// A special token entry of `tokenizer_config.json`: a string, an `AddedToken` object with
/// `content`, or null.
fn special_token_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Object(object) => object.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The most minijinja fuel (about one unit per instruction and per 64 bytes of data) that one
/// render of a chat template may use. It bounds the time of a template that loops too long; the
/// Qwen2 template renders a chat of 2000 messages of 1200 characters each within it.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// A Jinja environment configured as transformers configures its chat-template sandbox
/// (transformers 4.4x–5.x): `trim_blocks`, `lstrip_blocks`, loop controls, Python string methods,
/// `raise_exception`, and a `tojson` without HTML escaping.
fn template_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_fuel(Some(TEMPLATE_FUEL));

    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid");
    env.set_syntax(syntax);

    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    // NOTE: transformers also provides `strftime_now(format)`; the Qwen2 templates do not use it,
    // so a template that calls it fails with an "unknown function" error.
    env
}

/// `tojson` as transformers defines it for chat templates: Python's
/// `json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`.
/// Jinja's own `tojson` would HTML-escape `<`, `>`, `&` and `'`, which changes the prompt.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let (item_separator, key_separator) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson separators must be a pair, got {} items",
                    other.len()
                ),
            ));
        }
        // Python's json.dumps drops the space after "," when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };

    let format = PythonJson {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item_separator,
        key_separator,
    };
    let mut out = String::new();
    format.write(&value, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct PythonJson {
    indent: Option<usize>,
    sort_keys: bool,
    item_separator: String,
    key_separator: String,
}

impl PythonJson {
    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => out.push_str(&python_number(value)),
            ValueKind::String => out.push_str(&json_string(value.as_str().unwrap_or_default())),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, depth, '[', ']', items.len(), |index, out| {
                    self.write(&items[index], depth + 1, out)
                })?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|key| key.to_string());
                }
                self.write_container(out, depth, '{', '}', keys.len(), |index, out| {
                    let key = &keys[index];
                    let key_text = match key.as_str() {
                        Some(text) => text.to_string(),
                        None => key.to_string(),
                    };
                    out.push_str(&json_string(&key_text));
                    out.push_str(&self.key_separator);
                    self.write(&value.get_item(key)?, depth + 1, out)
                })?;
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson cannot serialize a value of kind {}", value.kind()),
                ));
            }
        }
        Ok(())
    }

    fn write_container(
        &self,
        out: &mut String,
        depth: usize,
        open: char,
        close: char,
        len: usize,
        mut write_item: impl FnMut(usize, &mut String) -> Result<(), minijinja::Error>,
    ) -> Result<(), minijinja::Error> {
        out.push(open);
        if len == 0 {
            out.push(close);
            return Ok(());
        }

        for index in 0..len {
            if index > 0 {
                out.push_str(&self.item_separator);
            }
            if let Some(indent) = self.indent {
                out.push('\n');
                out.push_str(&" ".repeat(indent * (depth + 1)));
            }
            write_item(index, out)?;
        }
        if let Some(indent) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
        out.push(close);
        Ok(())
    }
}

/// A JSON string literal with the escapes Python's `json.dumps(ensure_ascii=False)` uses, which are
/// the ones `serde_json` uses: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f` and `\u00XX` for other
/// control characters; everything else is written as is.
fn json_string(text: &str) -> String {
    serde_json::to_string(text).expect("serializing a str cannot fail")
}

/// A number as Python's `json.dumps` writes it: integers plainly, floats with `repr` (`1.0`,
/// `0.1`, `1e+16`, `NaN`, `Infinity`).
fn python_number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    let Ok(float) = f64::try_from(value.clone()) else {
        return value.to_string();
    };

    if float.is_nan() {
        return "NaN".into();
    }
    if float.is_infinite() {
        return if float > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }

    // Python's repr uses the shortest round-trip digits, in positional notation for exponents in
    // [-4, 16) and scientific notation otherwise.
    let exponent = if float == 0.0 {
        0
    } else {
        float.abs().log10().floor() as i32
    };
    if (-4..16).contains(&exponent) {
        let text = format!("{float}");
        if text.contains('.') {
            text
        } else {
            format!("{text}.0")
        }
    } else {
        let text = format!("{float:e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let exponent: i32 = exponent.parse().unwrap_or(0);
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_tojson(template: &str, context: Value) -> String {
        template_environment()
            .render_str(template, context)
            .unwrap()
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let value: serde_json::Value = serde_json::from_str(
            r#"{"name": "get_weather", "b": [1, 2.5, true, null], "s": "<a & 'b'> é\n\u0001"}"#,
        )
        .unwrap();
        let context = minijinja::context! { v => Value::from(minijinja::value::Serde(&value)) };
        let rendered = render_tojson("{{ v | tojson }}", context.clone());
        // Keys are sorted here because the value went through serde_json's map without
        // preserve_order; json.dumps(sort_keys=True) gives the same text.
        assert_eq!(
            rendered,
            r#"{"b": [1, 2.5, true, null], "name": "get_weather", "s": "<a & 'b'> é\n\u0001"}"#
        );

        let indented = render_tojson("{{ v.b | tojson(indent=2) }}", context);
        assert_eq!(indented, "[\n  1,\n  2.5,\n  true,\n  null\n]");
    }

    #[test]
    fn python_float_repr() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-7, "1.5e-07"),
            (123456.789, "123456.789"),
            (-0.0001, "-0.0001"),
            (0.00001, "1e-05"),
            (1e15, "1000000000000000.0"),
        ];
        for (float, expected) in cases {
            assert_eq!(python_number(&Value::from(float)), expected, "{float}");
        }
    }

    #[test]
    fn parse_chat_errors_name_the_problem() {
        let cases = [
            ("[{\"role\": \"user\"", "not valid JSON"),
            (
                "{\"role\": \"user\", \"content\": \"hi\"}",
                "an object at the top level",
            ),
            ("[\"hi\"]", "message 0 is a string"),
            (
                "[{\"role\": \"user\"}]",
                "message 0 has no \"content\" field",
            ),
            (
                "[{\"role\": \"user\", \"content\": 3}]",
                "\"content\" is a number",
            ),
            ("[]", "no messages"),
            (
                "[{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"robot\", \"content\": \"b\"}]",
                "message 1 has unknown role \"robot\"; valid roles are system, user, assistant, tool",
            ),
        ];
        for (text, expected) in cases {
            let error = parse_chat_json(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }
}
