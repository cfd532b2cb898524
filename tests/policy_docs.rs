//! The example in docs/config.md loads, so the reference never shows a config that fails.

use usbroute::config::Config;

#[test]
fn documented_example_config_loads() {
    let doc = include_str!("../docs/config.md");
    let start = doc.find("```toml\n").expect("toml block") + "```toml\n".len();
    let len = doc[start..].find("```").expect("block end");
    let config = Config::parse(&doc[start..start + len], None).map_err(|e| e.to_string());
    assert_eq!(config.map(|c| (c.vms.len(), c.rules.len())), Ok((2, 4)));
}
