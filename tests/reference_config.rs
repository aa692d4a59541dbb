//! The shipped reference config must load as it is: every key in it exists and every value is
//! valid (unknown keys are refused at start-up).

#[test]
fn reference_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/wsbridge.toml");
    let config =
        wsbridge::config::Config::load(Some(&path)).expect("config/wsbridge.toml must load");
    assert_eq!(config.inbound.streams, ["chat"]);
    assert_eq!(config.server.listen, "127.0.0.1:8080");
    assert_eq!(
        config.history_for("room:lobby").map(|c| c.history_size),
        Some(1000)
    );
    assert!(config.history_for("lobby").is_none());
}
