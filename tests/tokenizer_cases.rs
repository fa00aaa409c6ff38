//! The Qwen2.5 tokenizer and chat template against the goldens computed with transformers.

use qwenlens_tests::{fixture_model, fixtures_dir};
use qwenlens_weights::{ChatMessage, Tokenizer, parse_chat_json};
use serde_json::Value;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(fixtures_dir().join("tokenizer/qwen2.5")).expect("Qwen2.5 tokenizer")
}

fn load_cases(name: &str) -> Vec<Value> {
    let path = fixtures_dir().join("tokenizer/qwen2.5").join(name);
    let text = std::fs::read_to_string(&path).expect("tokenizer goldens");
    serde_json::from_str(&text).expect("goldens are JSON")
}

fn ids_of(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .expect("ids list")
        .iter()
        .map(|id| id.as_u64().expect("integer id") as u32)
        .collect()
}

#[test]
fn encode_tokens_decode_match_goldens() {
    let tokenizer = tokenizer();
    let cases = load_cases("cases.json");
    assert_eq!(cases.len(), 41);

    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let expected_ids = ids_of(&case["ids"]);
        let expected_tokens: Vec<&str> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|token| token.as_str().unwrap())
            .collect();
        let expected_decoded = case["decoded"].as_str().unwrap();

        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(ids, expected_ids, "{name}: ids");
        let tokens = tokenizer.tokens(&ids).unwrap();
        assert_eq!(tokens, expected_tokens, "{name}: tokens");
        let decoded = tokenizer.decode(&ids).unwrap();
        assert_eq!(decoded, expected_decoded, "{name}: decoded");
    }
}

#[test]
fn combining_accents_decode_to_nfc() {
    let tokenizer = tokenizer();
    let cases = load_cases("cases.json");
    let find = |name: &str| cases.iter().find(|case| case["name"] == name).unwrap();
    let combining = find("combining_nfc");
    let text = combining["text"].as_str().unwrap();

    let decoded = tokenizer.decode(&tokenizer.encode(text).unwrap()).unwrap();
    assert_ne!(decoded, text, "the input is not in NFC form");
    assert_eq!(decoded, combining["decoded"].as_str().unwrap());
    assert_eq!(
        tokenizer.encode(text).unwrap(),
        tokenizer
            .encode(find("precomposed")["text"].as_str().unwrap())
            .unwrap()
    );
}

#[test]
fn special_tokens_are_single_ids() {
    let tokenizer = tokenizer();
    assert_eq!(tokenizer.encode("<|im_start|>").unwrap(), vec![151644]);
    assert_eq!(tokenizer.encode("<|im_end|>").unwrap(), vec![151645]);
    assert_eq!(tokenizer.encode("<|endoftext|>").unwrap(), vec![151643]);
    assert_eq!(tokenizer.token_to_id("<|im_start|>"), Some(151644));
    assert_eq!(tokenizer.vocab_size(), 151665);
    // No BOS is prepended: "Hello" is a single token.
    assert_eq!(tokenizer.encode("Hello").unwrap(), vec![9707]);
}

#[test]
fn tokens_out_of_vocabulary_is_error() {
    let tokenizer = tokenizer();
    let error = tokenizer.tokens(&[9707, 151700]).unwrap_err().to_string();
    assert!(error.contains("151700"), "{error}");
    assert!(error.contains("151665"), "{error}");
}

#[test]
fn chat_template_matches_goldens() {
    let tokenizer = tokenizer();
    let cases = load_cases("chat_cases.json");
    assert_eq!(cases.len(), 8);

    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let messages = parse_chat_json(&case["messages"].to_string()).unwrap();
        let add_generation_prompt = case["add_generation_prompt"].as_bool().unwrap();

        let rendered = tokenizer
            .apply_chat_template(&messages, add_generation_prompt)
            .unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "{name}: rendered"
        );
        let ids = tokenizer
            .encode_chat(&messages, add_generation_prompt)
            .unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "{name}: ids");
        assert_eq!(tokenizer.decode(&ids).unwrap(), rendered, "{name}: decode");
    }
}

#[test]
fn chat_len33_golden_prompt() {
    // The prompt of tiny-gqa's len33 golden: default system prompt, generation prompt added.
    let tokenizer = Tokenizer::from_dir(fixture_model("tiny-gqa")).unwrap();
    let messages = [ChatMessage::user("Count to three.")];
    let rendered = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nCount to three.<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tokenizer.encode(&rendered).unwrap();
    assert_eq!(ids.len(), 33);
    assert_eq!(&ids[..3], &[151644, 8948, 198]);
    assert_eq!(&ids[30..], &[151644, 77091, 198]);
}

#[test]
fn chat_tool_turns_render_as_user_responses() {
    let tokenizer = tokenizer();
    let messages = [
        ChatMessage::user("Weather in Paris?"),
        ChatMessage::assistant("Checking."),
        ChatMessage::new("tool", "{\"temp\": 21}"),
        ChatMessage::new("tool", "{\"sky\": \"clear\"}"),
    ];
    let rendered = tokenizer.apply_chat_template(&messages, true).unwrap();
    let expected = concat!(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
        "<|im_start|>assistant\nChecking.<|im_end|>\n",
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n{\"sky\": \"clear\"}\n</tool_response><|im_end|>\n",
        "<|im_start|>assistant\n",
    );
    assert_eq!(rendered, expected);
}

#[test]
fn chat_unknown_role_lists_valid_roles() {
    let tokenizer = tokenizer();
    let messages = [ChatMessage::new("narrator", "Once upon a time")];
    let error = tokenizer
        .apply_chat_template(&messages, true)
        .unwrap_err()
        .to_string();
    assert!(error.contains("\"narrator\""), "{error}");
    assert!(error.contains("system, user, assistant, tool"), "{error}");
}

#[test]
fn decode_ids_beyond_tokenizer_vocabulary() {
    // The model's d_vocab (151936) exceeds the tokenizer's 151665 tokens; a model can still predict
    // those padding rows, and decoding must not fail on them. tiny-gqa's config.json gives d_vocab.
    let tokenizer = Tokenizer::from_dir(fixture_model("tiny-gqa")).unwrap();
    let text = tokenizer.decode(&[9707, 151700, 1879]).unwrap();
    assert_eq!(text, "Hello world");
}

#[test]
fn decode_ids_beyond_model_vocabulary_is_error() {
    let model_tokenizer = Tokenizer::from_dir(fixture_model("tiny-gqa")).unwrap();
    let error = model_tokenizer
        .decode(&[9707, 999_999])
        .unwrap_err()
        .to_string();
    assert!(error.contains("token id 999999"), "{error}");
    assert!(error.contains("151665"), "{error}");
    assert!(error.contains("vocab_size of 151936"), "{error}");
    assert!(model_tokenizer.tokens(&[999_999]).is_err());

    // Without config.json the tokenizer knows no padding rows, so decode rejects what tokens does.
    let error = tokenizer().decode(&[151_700]).unwrap_err().to_string();
    assert!(error.contains("token id 151700"), "{error}");
}

#[test]
fn long_chat_renders_within_template_fuel() {
    let tokenizer = tokenizer();
    let content = "a sentence of ordinary length, repeated to fill the context. ".repeat(20);
    let messages: Vec<ChatMessage> = (0..2000)
        .map(|index| {
            if index % 2 == 0 {
                ChatMessage::user(content.clone())
            } else {
                ChatMessage::assistant(content.clone())
            }
        })
        .collect();

    let prompt = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(prompt.matches("<|im_start|>user").count(), 1000);
}
