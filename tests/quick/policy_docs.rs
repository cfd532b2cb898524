//! The examples in docs/config.md load, so the reference never shows a config that fails.

use usbroute::config::Config;

/// Every ```toml block of docs/config.md, in order.
fn toml_blocks() -> Vec<&'static str> {
    let doc = include_str!("../../docs/config.md");
    doc.split("```toml\n")
        .skip(1)
        .map(|block| &block[..block.find("```").expect("block end")])
        .collect()
}

#[test]
fn documented_example_config_loads() {
    let first = toml_blocks()[0];

    let config = Config::parse(first, None).map_err(|e| e.to_string());

    assert_eq!(config.map(|c| (c.vms.len(), c.rules.len())), Ok((2, 4)));
}

#[test]
fn every_toml_example_in_the_config_reference_loads() {
    let blocks = toml_blocks();

    let failures: Vec<String> = blocks
        .iter()
        .filter_map(|block| Config::parse(block, None).err())
        .map(|e| e.to_string())
        .collect();

    assert!(blocks.len() >= 2, "{} toml blocks", blocks.len());
    assert_eq!(failures, Vec::<String>::new());
}
