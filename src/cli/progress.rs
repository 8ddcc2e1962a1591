//! Pull progress for `deliverous image pull`: on a terminal, one bar per layer (bytes, rate),
//! redrawn in place; elsewhere (logs, CI) and with `NO_COLOR`, one plain line per finished
//! layer and no escape sequence (see [`crate::terminal`]).

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use serde_json::Value;

use crate::apps::format_bytes;

const BAR: usize = 24;

struct Layer {
    digest: String,
    size: u64,
    bytes: u64,
    started: Option<Instant>,
    /// `Some(cached)` once ready.
    done: Option<bool>,
}

pub struct PullView {
    tty: bool,
    layers: Vec<Layer>,
    index: HashMap<String, usize>,
    /// Lines drawn last time (to move back up over them).
    drawn: usize,
    last_draw: Option<Instant>,
}

impl PullView {
    pub fn new(tty: bool) -> PullView {
        PullView { tty, layers: Vec::new(), index: HashMap::new(), drawn: 0, last_draw: None }
    }

    pub fn event(&mut self, event: &Value) {
        let digest = event["digest"].as_str().unwrap_or_default().to_string();
        match event["event"].as_str() {
            Some("layers") => {
                for l in event["layers"].as_array().into_iter().flatten() {
                    let digest = l["digest"].as_str().unwrap_or_default().to_string();
                    self.index.insert(digest.clone(), self.layers.len());
                    let size = l["size"].as_u64().unwrap_or(0);
                    self.layers.push(Layer { digest, size, bytes: 0, started: None, done: None });
                }
            }
            Some("progress") => {
                if let Some(layer) = self.index.get(&digest).and_then(|i| self.layers.get_mut(*i)) {
                    layer.started.get_or_insert_with(Instant::now);
                    layer.bytes = event["bytes"].as_u64().unwrap_or(layer.bytes);
                }
            }
            Some("done") => {
                let cached = event["cached"].as_bool().unwrap_or(false);
                if let Some(layer) = self.index.get(&digest).and_then(|i| self.layers.get_mut(*i)) {
                    layer.done = Some(cached);
                    if !cached {
                        layer.bytes = layer.bytes.max(layer.size);
                    }
                    if !self.tty {
                        eprintln!("{}", plain_line(layer));
                    }
                }
            }
            _ => {}
        }
        if self.tty {
            // At most 10 redraws a second, but always the final state of a layer.
            let due = self.last_draw.is_none_or(|t| t.elapsed().as_millis() >= 100);
            if due || event["event"] == "done" || event["event"] == "layers" {
                self.draw();
            }
        }
    }

    /// The last full picture (a terminal could have missed the final redraw).
    pub fn finish(&mut self) {
        if self.tty && !self.layers.is_empty() {
            self.draw();
        }
    }

    fn draw(&mut self) {
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for layer in &self.layers {
            out.push_str("\x1b[2K");
            out.push_str(&bar_line(layer));
            out.push('\n');
        }
        self.drawn = self.layers.len();
        self.last_draw = Some(Instant::now());
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

fn rate(layer: &Layer) -> String {
    match layer.started {
        Some(t) if t.elapsed().as_secs_f64() > 0.05 => {
            format!("{}/s", format_bytes((layer.bytes as f64 / t.elapsed().as_secs_f64()) as u64))
        }
        _ => String::new(),
    }
}

fn bar_line(layer: &Layer) -> String {
    let name = short(&layer.digest);
    match layer.done {
        Some(true) => format!("{name}  already present"),
        Some(false) => format!("{name}  done  {}", format_bytes(layer.size)),
        None if layer.started.is_none() => format!("{name}  waiting  {}", format_bytes(layer.size)),
        None => {
            let fraction = if layer.size > 0 { (layer.bytes as f64 / layer.size as f64).min(1.0) } else { 0.0 };
            let filled = (fraction * BAR as f64) as usize;
            format!(
                "{name}  [{}{}]  {} / {}  {}",
                "#".repeat(filled),
                "-".repeat(BAR - filled),
                format_bytes(layer.bytes),
                format_bytes(layer.size),
                rate(layer)
            )
        }
    }
}

fn plain_line(layer: &Layer) -> String {
    match layer.done {
        Some(true) => format!("layer {}: already present", short(&layer.digest)),
        _ => {
            let took = layer.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
            format!(
                "layer {}: {} downloaded and unpacked in {took:.1}s {}",
                short(&layer.digest),
                format_bytes(layer.size),
                rate(layer)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lines_and_bars_say_where_each_layer_is() {
        let mut layer = Layer {
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 2 << 20,
            bytes: 1 << 20,
            started: None,
            done: None,
        };
        assert_eq!(bar_line(&layer), "abababababab  waiting  2M");
        layer.started = Some(Instant::now());
        assert!(
            bar_line(&layer).starts_with("abababababab  [############------------]  1M / 2M"),
            "{}",
            bar_line(&layer)
        );
        layer.done = Some(true);
        assert_eq!(plain_line(&layer), "layer abababababab: already present");
        let mut view = PullView::new(false);
        view.event(&json!({"event": "layers", "layers": [{"digest": layer.digest, "size": 10}]}));
        view.event(&json!({"event": "done", "digest": layer.digest, "cached": false}));
        assert_eq!(view.layers[0].done, Some(false));
        assert_eq!(view.layers[0].bytes, 10);
    }
}
