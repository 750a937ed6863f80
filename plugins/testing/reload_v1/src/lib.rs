//! Hot-reload probe, version 1: counts steps and answers `continue`.
const VERSION: &str = "1.0.0";
const V2: bool = false;
include!("../../reload_common.rs");
