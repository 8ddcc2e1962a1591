//! `stop_timeout` in a create or config request: seconds, or `0`, `"default"` or `null` for the
//! daemon's own `--stop-timeout` (so a configured timeout can be taken back).

use serde::de::{self, Deserializer, Visitor};

/// The field of a config request: absent (`None`) leaves the timeout as it is; present, it is
/// `Some(None)` for the daemon's default or `Some(Some(seconds))`.
pub fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u32>>, D::Error> {
    d.deserialize_any(Seconds).map(Some)
}

struct Seconds;

impl<'de> Visitor<'de> for Seconds {
    type Value = Option<u32>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number of seconds, or 0, \"default\" or null for the daemon's default")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        let secs = u32::try_from(v).map_err(|_| E::custom(format!("stop_timeout {v} is too large")))?;
        Ok((secs != 0).then_some(secs))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.eq_ignore_ascii_case("default") {
            Ok(None)
        } else {
            Err(E::invalid_value(de::Unexpected::Str(v), &self))
        }
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "super::field")]
        stop_timeout: Option<Option<u32>>,
    }

    fn parse(text: &str) -> Result<Option<Option<u32>>, String> {
        serde_json::from_str::<Body>(text).map(|b| b.stop_timeout).map_err(|e| e.to_string())
    }

    #[test]
    fn zero_default_and_null_mean_the_daemon_default_and_absent_means_unchanged() {
        assert_eq!(parse("{}"), Ok(None));
        assert_eq!(parse(r#"{"stop_timeout": 30}"#), Ok(Some(Some(30))));
        for reset in ["0", "null", r#""default""#, r#""DEFAULT""#] {
            assert_eq!(parse(&format!(r#"{{"stop_timeout": {reset}}}"#)), Ok(Some(None)), "{reset}");
        }
        for bad in ["-1", "1.5", r#""10s""#, "4294967296", "[]"] {
            let e = parse(&format!(r#"{{"stop_timeout": {bad}}}"#)).expect_err(bad);
            assert!(e.contains("stop_timeout") || e.contains("default"), "{bad}: {e}");
        }
    }
}
