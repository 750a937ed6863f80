# lorahost developer commands. `make demo` and `make test` are the two fresh-machine commands.
PLUGINS := plugins/target/wasm32-wasip2/release

.PHONY: demo replay-demo test plugins lint bench

## Build the plugins, then fine-tune the tiny SAM3 on synthetic cracks (configs/demo.yaml) with
## spike_guard and balanced_sampler; outputs in target/demo/run.
demo: plugins
	cargo run --release -- train --config configs/demo.yaml

## Replay the diagnosis run (loss 169, 141, 169, 242, ...) through spike_guard and warmup_validator.
replay-demo: plugins
	cargo run --release -- plugin replay $(PLUGINS)/spike_guard.wasm $(PLUGINS)/warmup_validator.wasm \
		--trace examples/traces/diagnosis.jsonl

## Every test: the host suite (builds the plugins itself) and the plugins' own unit tests.
test: plugins
	cargo test --release
	cargo test --manifest-path plugins/Cargo.toml

## The reference and test plugins as wasm32-wasip2 components.
plugins:
	rustup target add wasm32-wasip2
	cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml

## Formatting and lints, as CI runs them.
lint:
	cargo fmt --all --check
	cargo fmt --all --check --manifest-path plugins/Cargo.toml
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --manifest-path plugins/Cargo.toml -- -D warnings

## Plugin runtime benchmarks (numbers go to BENCHMARKS.md).
bench: plugins
	cargo bench --bench plugins
