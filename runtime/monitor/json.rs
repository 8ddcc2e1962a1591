//! The control protocol's JSON, by hand (the monitor is std-only): requests are parsed from
//! one line each, replies and exit statuses are written exactly as `protocol.rs`'s serde types
//! write them, so the daemon's client and the exit file cannot tell the two apart.

use std::fmt::Write as _;

/// A request on the control socket (see `protocol::Request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    State,
    Signal { signal: i32 },
    Stop { signal: i32, timeout_ms: u64 },
    Wait,
}

/// How the instance ended (see `protocol::ExitStatus`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub oom: bool,
    pub finished_at: String,
}

impl ExitStatus {
    /// `oom`, `signal 9`, `exit 0`: as `protocol::ExitStatus::reason`.
    pub fn reason(&self) -> String {
        super::reason::exit_reason(self.oom, self.signal, self.code)
    }

    /// `{"code":0,"signal":null,"oom":false,"finished_at":"…"}`.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(96);
        out.push_str("{\"code\":");
        push_opt(&mut out, self.code);
        out.push_str(",\"signal\":");
        push_opt(&mut out, self.signal);
        out.push_str(if self.oom { ",\"oom\":true" } else { ",\"oom\":false" });
        out.push_str(",\"finished_at\":");
        push_str(&mut out, &self.finished_at);
        out.push('}');
        out
    }
}

/// A reply (see `protocol::Reply`); absent fields are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub ok: bool,
    pub error: Option<String>,
    pub pid: Option<i32>,
    pub exit: Option<ExitStatus>,
}

impl Reply {
    pub fn error(msg: String) -> Reply {
        Reply { ok: false, error: Some(msg), pid: None, exit: None }
    }

    /// One line of JSON, without the newline.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push_str(if self.ok { "{\"ok\":true" } else { "{\"ok\":false" });
        if let Some(e) = &self.error {
            out.push_str(",\"error\":");
            push_str(&mut out, e);
        }
        if let Some(pid) = self.pid {
            let _ = write!(out, ",\"pid\":{pid}");
        }
        if let Some(exit) = &self.exit {
            out.push_str(",\"exit\":");
            out.push_str(&exit.to_json());
        }
        out.push('}');
        out
    }
}

fn push_opt(out: &mut String, v: Option<i32>) {
    match v {
        Some(v) => {
            let _ = write!(out, "{v}");
        }
        None => out.push_str("null"),
    }
}

/// A JSON string literal, escaped as serde_json escapes it.
fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses one request line: a JSON object with an `op` and the fields that op needs (others are
/// ignored, as serde does). The error says what was wrong, for a `bad request: …` reply.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8".to_string())?;
    let mut p = Parser { s: text.as_bytes(), i: 0, depth: 0 };
    let value = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing characters at column {}", p.i + 1));
    }
    let Value::Obj(fields) = value else {
        return Err("expected a JSON object".into());
    };
    let field = |name: &str| -> Option<&Value> { fields.iter().find(|(k, _)| k == name).map(|(_, v)| v) };
    let int = |name: &str| -> Result<i128, String> {
        match field(name) {
            None => Err(format!("missing field `{name}`")),
            Some(Value::Num(raw)) => raw.parse::<i128>().map_err(|_| format!("`{name}` must be an integer, not {raw}")),
            Some(_) => Err(format!("`{name}` must be an integer")),
        }
    };
    let op = match field("op") {
        Some(Value::Str(op)) => op.as_str(),
        Some(_) => return Err("`op` must be a string".into()),
        None => return Err("missing field `op`".into()),
    };
    let signal = || -> Result<i32, String> {
        int("signal").and_then(|n| i32::try_from(n).map_err(|_| format!("signal {n} is out of range")))
    };
    match op {
        "state" => Ok(Request::State),
        "wait" => Ok(Request::Wait),
        "signal" => Ok(Request::Signal { signal: signal()? }),
        "stop" => {
            let signal = signal()?;
            let timeout_ms = int("timeout_ms")
                .and_then(|n| u64::try_from(n).map_err(|_| format!("timeout_ms {n} is out of range")))?;
            Ok(Request::Stop { signal, timeout_ms })
        }
        other => Err(format!("unknown op `{other}`, expected one of `state`, `signal`, `stop`, `wait`")),
    }
}

#[derive(Debug)]
enum Value {
    Null,
    Bool,
    /// The number's text, checked against JSON's grammar.
    Num(String),
    Str(String),
    Arr,
    Obj(Vec<(String, Value)>),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    depth: u32,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.s.get(self.i).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("expected {what} at column {}", self.i + 1))
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        self.ws();
        self.depth += 1;
        if self.depth > 32 {
            return Err("nested too deep".into());
        }
        let v = match self.s.get(self.i) {
            Some(b'{') => self.object(),
            Some(b'[') => self.array(),
            Some(b'"') => self.string().map(Value::Str),
            Some(b't') => self.word("true", Value::Bool),
            Some(b'f') => self.word("false", Value::Bool),
            Some(b'n') => self.word("null", Value::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => self.err("a value"),
        };
        self.depth -= 1;
        v
    }

    fn word(&mut self, w: &str, v: Value) -> Result<Value, String> {
        if self.s[self.i..].starts_with(w.as_bytes()) {
            self.i += w.len();
            Ok(v)
        } else {
            self.err("a value")
        }
    }

    fn object(&mut self) -> Result<Value, String> {
        self.i += 1;
        let mut fields = Vec::new();
        self.ws();
        if self.eat(b'}') {
            return Ok(Value::Obj(fields));
        }
        loop {
            self.ws();
            if self.s.get(self.i) != Some(&b'"') {
                return self.err("a field name");
            }
            let key = self.string()?;
            self.ws();
            if !self.eat(b':') {
                return self.err("`:`");
            }
            let value = self.value()?;
            if fields.iter().any(|(k, _)| *k == key) {
                return Err(format!("duplicate field `{key}`"));
            }
            fields.push((key, value));
            self.ws();
            if self.eat(b'}') {
                return Ok(Value::Obj(fields));
            }
            if !self.eat(b',') {
                return self.err("`,` or `}`");
            }
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.i += 1;
        self.ws();
        if self.eat(b']') {
            return Ok(Value::Arr);
        }
        loop {
            self.value()?;
            self.ws();
            if self.eat(b']') {
                return Ok(Value::Arr);
            }
            if !self.eat(b',') {
                return self.err("`,` or `]`");
            }
        }
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.i;
        self.eat(b'-');
        let digits = |p: &mut Self| {
            let from = p.i;
            while p.s.get(p.i).is_some_and(u8::is_ascii_digit) {
                p.i += 1;
            }
            p.i - from
        };
        match self.s.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return self.err("a digit"),
        }
        if self.eat(b'.') && digits(self) == 0 {
            return self.err("a digit");
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if digits(self) == 0 {
                return self.err("a digit");
            }
        }
        Ok(Value::Num(String::from_utf8_lossy(&self.s[start..self.i]).into_owned()))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let Some(h) = self.s.get(self.i..self.i + 4) else {
            return self.err("four hex digits");
        };
        let n = std::str::from_utf8(h).ok().and_then(|h| u32::from_str_radix(h, 16).ok());
        match n {
            Some(n) if h.iter().all(u8::is_ascii_hexdigit) => {
                self.i += 4;
                Ok(n)
            }
            _ => self.err("four hex digits"),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.i += 1;
        let mut out = String::new();
        loop {
            let start = self.i;
            while self.s.get(self.i).is_some_and(|b| *b != b'"' && *b != b'\\' && *b >= 0x20) {
                self.i += 1;
            }
            // The input is valid UTF-8 and we stopped at an ASCII byte: a char boundary.
            out.push_str(&String::from_utf8_lossy(&self.s[start..self.i]));
            match self.s.get(self.i) {
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.i += 1;
                    let Some(&esc) = self.s.get(self.i) else {
                        return self.err("an escape");
                    };
                    self.i += 1;
                    let c = match esc {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xd800..0xdc00).contains(&hi) {
                                if !(self.eat(b'\\') && self.eat(b'u')) {
                                    return self.err("a low surrogate");
                                }
                                let lo = self.hex4()?;
                                if !(0xdc00..0xe000).contains(&lo) {
                                    return self.err("a low surrogate");
                                }
                                0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                            } else {
                                hi
                            };
                            match char::from_u32(code) {
                                Some(c) => c,
                                None => return self.err("a valid code point"),
                            }
                        }
                        _ => return self.err("a valid escape"),
                    };
                    out.push(c);
                }
                Some(_) => return self.err("no control character in a string"),
                None => return self.err("the end of the string"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shim::protocol;

    fn ours_of(r: &protocol::Request) -> Request {
        match *r {
            protocol::Request::State => Request::State,
            protocol::Request::Wait => Request::Wait,
            protocol::Request::Signal { signal } => Request::Signal { signal },
            protocol::Request::Stop { signal, timeout_ms } => Request::Stop { signal, timeout_ms },
        }
    }

    /// Whatever serde accepts we accept with the same meaning, and whatever it refuses we refuse.
    #[test]
    fn parses_requests_as_serde_does() {
        let lines = [
            r#"{"op":"state"}"#,
            "{\"op\":\"state\"}\n",
            " { \"op\" : \"wait\" } \r\n",
            r#"{"op":"signal","signal":15}"#,
            r#"{"signal":-3,"op":"signal"}"#,
            r#"{"op":"signal","signal":2147483647}"#,
            r#"{"op":"signal","signal":2147483648}"#,
            r#"{"op":"signal","signal":15.0}"#,
            r#"{"op":"signal","signal":1e3}"#,
            r#"{"op":"signal","signal":"15"}"#,
            r#"{"op":"signal"}"#,
            r#"{"op":"stop","signal":15,"timeout_ms":10000}"#,
            r#"{"op":"stop","signal":15,"timeout_ms":18446744073709551615}"#,
            r#"{"op":"stop","signal":15,"timeout_ms":-1}"#,
            r#"{"op":"stop","signal":15}"#,
            r#"{"op":"stop","signal":9,"timeout_ms":0,"extra":{"a":[1,2,{"b":null}],"c":"\u00e9\ud83d\ude00"}}"#,
            r#"{"op":"st\u0061te"}"#,
            r#"{"op":"reboot"}"#,
            r#"{"op":3}"#,
            r#"{}"#,
            r#"[]"#,
            r#""state""#,
            r#"{"op":"state"} x"#,
            r#"{"op":"state",}"#,
            r#"{"op":"state""#,
            r#"{"op":"state\"}"#,
            r#"{"op":"signal","signal":015}"#,
            r#"{"op":"signal","signal":-}"#,
            "{\"op\":\"st\tate\"}",
            r#"{"op":"state","x":tru}"#,
            r#"{"op":"state","x":"\ud83d"}"#,
            "",
            "\n",
        ];
        for line in lines {
            let theirs = serde_json::from_str::<protocol::Request>(line);
            let ours = parse_request(line.as_bytes());
            match (&theirs, &ours) {
                (Ok(t), Ok(o)) => assert_eq!(&ours_of(t), o, "{line:?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{line:?}: serde says {theirs:?}, we say {ours:?}"),
            }
        }
        assert!(parse_request(&[b'{', 0xff, b'}']).is_err());
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse_request(deep.as_bytes()).is_err());
    }

    /// Replies and exit statuses are byte for byte what serde writes.
    #[test]
    fn writes_replies_as_serde_does() {
        let exits = [
            ExitStatus { code: Some(0), signal: None, oom: false, finished_at: "2026-11-25T00:00:00.000Z".into() },
            ExitStatus { code: None, signal: Some(9), oom: true, finished_at: "t".into() },
            ExitStatus { code: Some(-1), signal: Some(15), oom: false, finished_at: "\"\\\n\u{1}\u{7f}é".into() },
        ];
        let theirs_exit = |e: &ExitStatus| protocol::ExitStatus {
            code: e.code,
            signal: e.signal,
            oom: e.oom,
            finished_at: e.finished_at.clone(),
        };
        for e in &exits {
            assert_eq!(e.to_json(), serde_json::to_string(&theirs_exit(e)).expect("serialize"));
            assert_eq!(e.reason(), theirs_exit(e).reason());
        }
        let replies = [
            Reply { ok: true, error: None, pid: Some(42), exit: None },
            Reply { ok: true, error: None, pid: Some(42), exit: Some(exits[1].clone()) },
            Reply::error("bad request: \"x\"\t\u{8}\u{c}\r\u{1f} ✓".into()),
            Reply { ok: false, error: None, pid: None, exit: Some(exits[2].clone()) },
        ];
        for r in &replies {
            let theirs = protocol::Reply {
                ok: r.ok,
                error: r.error.clone(),
                pid: r.pid,
                exit: r.exit.as_ref().map(theirs_exit),
            };
            assert_eq!(r.to_json(), serde_json::to_string(&theirs).expect("serialize"));
        }
    }
}
