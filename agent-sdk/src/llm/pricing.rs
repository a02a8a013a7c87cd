//! What a call cost: a vendored price table of the supported providers' chat models
//! (`prices.json`, derived from LiteLLM's MIT-licensed model price file by
//! `scripts/refresh-prices`), overridable per model in configuration. A model the table does
//! not know has an unknown cost (`None`), never zero.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Deserialize;

use super::{ModelRef, Usage};

/// USD per token, in and out.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input: f64,
    pub output: f64,
}

impl Price {
    /// Per million tokens, as configuration gives it.
    pub fn per_million(input: f64, output: f64) -> Price {
        Price {
            input: input / 1e6,
            output: output / 1e6,
        }
    }

    pub fn cost(&self, usage: Usage) -> f64 {
        usage.input_tokens as f64 * self.input + usage.output_tokens as f64 * self.output
    }
}

#[derive(Deserialize)]
struct Table {
    models: HashMap<String, Price>,
}

fn vendored() -> &'static HashMap<String, Price> {
    static TABLE: OnceLock<HashMap<String, Price>> = OnceLock::new();
    TABLE.get_or_init(|| {
        serde_json::from_str::<Table>(include_str!("prices.json"))
            .map(|t| t.models)
            .unwrap_or_default()
    })
}

/// Prices by model: the vendored table under the configured overrides.
#[derive(Clone, Debug, Default)]
pub struct Prices {
    overrides: HashMap<String, Price>,
}

impl Prices {
    /// `overrides` keyed by `provider/model`.
    pub fn new(overrides: HashMap<String, Price>) -> Prices {
        Prices { overrides }
    }

    pub fn price(&self, model: &ModelRef) -> Option<Price> {
        let key = model.to_string();
        self.overrides
            .get(&key)
            .or_else(|| vendored().get(&key))
            .copied()
    }

    /// The cost of `usage` on `model` in USD, or `None` when the model's price is unknown.
    pub fn cost(&self, model: &ModelRef, usage: Usage) -> Option<f64> {
        self.price(model).map(|p| p.cost(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vendored_table_prices_known_models_and_not_unknown_ones() {
        assert!(vendored().len() > 50, "the table loads");
        let prices = Prices::default();
        let mini = ModelRef::parse("openai/gpt-4o-mini").unwrap();
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
        };
        let cost = prices.cost(&mini, usage).expect("gpt-4o-mini is priced");
        let p = prices.price(&mini).unwrap();
        assert!((cost - (p.input + p.output) * 1e6).abs() < 1e-9);
        assert!(cost > 0.0);
        let unknown = ModelRef::parse("openai/no-such-model").unwrap();
        assert_eq!(prices.cost(&unknown, usage), None, "unknown, never zero");
    }

    #[test]
    fn configuration_overrides_a_price() {
        let m = ModelRef::parse("ollama/llama3.2").unwrap();
        let prices = Prices::new(HashMap::from([(
            m.to_string(),
            Price::per_million(1.0, 2.0),
        )]));
        let cost = prices.cost(
            &m,
            Usage {
                input_tokens: 500_000,
                output_tokens: 250_000,
            },
        );
        assert!(cost.is_some_and(|c| (c - 1.0).abs() < 1e-9), "{cost:?}");
    }
}
