//! Hub settings read from the environment. This binary has a single test because environment
//! variables are process-wide: parallel tests setting them would race.

use qwenlens_tests::standin_dir;
use qwenlens_weights::{Checkpoint, HubSettings, ModelSource};

fn set(name: &str, value: Option<&str>) {
    // SAFETY: this is the only test in this binary, so no other thread reads or writes the
    // environment while it runs.
    unsafe {
        match value {
            Some(value) => std::env::set_var(name, value),
            None => std::env::remove_var(name),
        }
    }
}

#[test]
fn hub_settings_follow_huggingface_hub_precedence() {
    // Found before HOME changes below, because its default location is under HOME.
    let hf_home = standin_dir().parent().unwrap().join("hf-home");
    for name in [
        "HF_HUB_CACHE",
        "HUGGINGFACE_HUB_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "HF_HUB_OFFLINE",
        "HF_ENDPOINT",
    ] {
        set(name, None);
    }

    set("HOME", Some("/home/someone"));
    let settings = HubSettings::from_env();
    assert_eq!(
        settings.cache_dir.to_str(),
        Some("/home/someone/.cache/huggingface/hub")
    );
    assert!(!settings.offline);
    assert_eq!(settings.endpoint, "https://huggingface.co");

    set("XDG_CACHE_HOME", Some("/xdg"));
    assert_eq!(
        HubSettings::from_env().cache_dir.to_str(),
        Some("/xdg/huggingface/hub")
    );

    set("HF_HOME", Some("/hf-home"));
    assert_eq!(
        HubSettings::from_env().cache_dir.to_str(),
        Some("/hf-home/hub")
    );

    set("HF_HUB_CACHE", Some("/hub-cache"));
    assert_eq!(
        HubSettings::from_env().cache_dir.to_str(),
        Some("/hub-cache")
    );

    for (value, expected) in [
        ("1", true),
        ("TRUE", true),
        ("yes", true),
        ("0", false),
        ("", false),
    ] {
        set("HF_HUB_OFFLINE", Some(value));
        assert_eq!(
            HubSettings::from_env().offline,
            expected,
            "HF_HUB_OFFLINE={value:?}"
        );
    }

    set("HF_ENDPOINT", Some("http://127.0.0.1:1"));
    assert_eq!(HubSettings::from_env().endpoint, "http://127.0.0.1:1");

    // The stand-in's cache through HF_HOME and HF_HUB_OFFLINE, as `qwenlens inspect` uses it.
    set("HF_HUB_CACHE", None);
    set("HF_HOME", hf_home.to_str());
    set("HF_HUB_OFFLINE", Some("1"));
    let source = ModelSource::parse("Qwen/Qwen2.5-0.5B-Instruct", "main").unwrap();
    let checkpoint = Checkpoint::load(&source).unwrap();
    assert_eq!(checkpoint.parameter_count(), 494_032_768);

    set("HF_HOME", Some("/nonexistent-hf-home"));
    let error = Checkpoint::load(&source).unwrap_err().to_string();
    assert!(error.contains("/nonexistent-hf-home/hub"), "{error}");
    assert!(error.contains("HF_HUB_OFFLINE"), "{error}");
}
