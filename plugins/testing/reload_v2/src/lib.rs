//! Hot-reload probe, version 2: keeps counting and answers `scale-lr(0.5)` with the count in
//! its reason-free metric, so a test can see the new behaviour and the carried-over state.
const VERSION: &str = "2.0.0";
const V2: bool = true;
include!("../../reload_common.rs");
