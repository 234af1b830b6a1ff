//! A JSON-producing subset of Python's `ast.literal_eval`, the last resort vLLM's parsers use
//! when a tool-call argument is not valid JSON (`{'city': 'Paris', 'ok': True}`, `(1, 2)`, `None`).
//!
//! Accepted: `str` literals (`'…'`, `"…"`, triple-quoted, `u`/`r` prefixes, the usual escapes,
//! implicit concatenation), `int` (decimal, `0x`/`0o`/`0b`, `_` separators), `float`, unary `+`/`-`
//! on numbers, `True`/`False`/`None`, lists, tuples (→ arrays), dicts (keys rendered the way
//! Python's `json.dumps` renders them). Everything Python accepts but `json.dumps` would then
//! reject (bytes, sets, complex numbers, non-finite floats, tuple keys), and integers beyond
//! 64 bits, give `None`, so the caller keeps the raw string.

use serde_json::{Map, Number, Value};

/// Deeper nesting is refused (Python would hit its own recursion limit too).
const MAX_DEPTH: usize = 100;

/// `ast.literal_eval(src)` rendered as JSON, or `None` if `src` is not such a literal.
pub(crate) fn literal_eval(src: &str) -> Option<Value> {
    let mut p = Lit { src, pos: 0, depth: 0 };
    p.ws();
    let first = p.expr()?;
    p.ws();
    let value = if p.eat(b',') {
        // A bare tuple: `1, 2`.
        let mut items = vec![first];
        p.seq_tail(&mut items, None)?;
        Value::Array(items)
    } else {
        first
    };
    p.ws();
    (p.pos == src.len()).then_some(value)
}

struct Lit<'a> {
    src: &'a str,
    pos: usize,
    depth: usize,
}

impl<'a> Lit<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.src.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.pos).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.pos += 1;
        }
        hit
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r' | 0x0c) = self.peek() {
            self.pos += 1;
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    fn leave(&mut self) {
        self.depth -= 1;
    }

    fn expr(&mut self) -> Option<Value> {
        self.ws();
        let c = self.peek()?;
        if self.string_start().is_some() {
            return self.strings();
        }
        match c {
            b'+' | b'-' => {
                self.pos += 1;
                self.enter()?;
                let v = self.expr()?;
                self.leave();
                signed(v, c == b'-')
            }
            b'[' => self.list(),
            b'(' => self.paren(),
            b'{' => self.brace(),
            b'0'..=b'9' | b'.' => self.number(),
            c if c.is_ascii_alphabetic() || c == b'_' => self.name(),
            _ => None,
        }
    }

    /// Items after a consumed `,`, up to and including `close` (or to the end when `None`).
    fn seq_tail(&mut self, items: &mut Vec<Value>, close: Option<u8>) -> Option<()> {
        loop {
            self.ws();
            match close {
                Some(c) if self.eat(c) => return Some(()),
                None if self.pos == self.src.len() => return Some(()),
                _ => {}
            }
            items.push(self.expr()?);
            self.ws();
            if !self.eat(b',') {
                return match close {
                    Some(c) => self.eat(c).then_some(()),
                    None => Some(()),
                };
            }
        }
    }

    fn list(&mut self) -> Option<Value> {
        self.enter()?;
        self.pos += 1;
        let mut items = Vec::new();
        self.ws();
        if !self.eat(b']') {
            items.push(self.expr()?);
            self.ws();
            if self.eat(b',') {
                self.seq_tail(&mut items, Some(b']'))?;
            } else if !self.eat(b']') {
                return None;
            }
        }
        self.leave();
        Some(Value::Array(items))
    }

    fn paren(&mut self) -> Option<Value> {
        self.enter()?;
        self.pos += 1;
        self.ws();
        let value = if self.eat(b')') {
            Value::Array(Vec::new())
        } else {
            let first = self.expr()?;
            self.ws();
            if self.eat(b',') {
                let mut items = vec![first];
                self.seq_tail(&mut items, Some(b')'))?;
                Value::Array(items)
            } else if self.eat(b')') {
                first
            } else {
                return None;
            }
        };
        self.leave();
        Some(value)
    }

    /// Dicts only: a set literal is not JSON-serialisable (`json.dumps` raises on it).
    fn brace(&mut self) -> Option<Value> {
        self.enter()?;
        self.pos += 1;
        let mut map = Map::new();
        loop {
            self.ws();
            if self.eat(b'}') {
                break;
            }
            let key = dict_key(self.expr()?)?;
            self.ws();
            if !self.eat(b':') {
                return None;
            }
            let value = self.expr()?;
            map.insert(key, value);
            self.ws();
            if self.eat(b'}') {
                break;
            }
            if !self.eat(b',') {
                return None;
            }
        }
        self.leave();
        Some(Value::Object(map))
    }

    fn name(&mut self) -> Option<Value> {
        let start = self.pos;
        while let Some(c) = self.peek()
            && (c.is_ascii_alphanumeric() || c == b'_')
        {
            self.pos += 1;
        }
        match &self.src[start..self.pos] {
            "True" => Some(Value::Bool(true)),
            "False" => Some(Value::Bool(false)),
            "None" => Some(Value::Null),
            _ => None,
        }
    }

    /// At a string literal: `(prefix length, raw)`. Only the `u` and `r` prefixes are taken;
    /// bytes (`b`) and f-strings are not JSON-able literals.
    fn string_start(&self) -> Option<(usize, bool)> {
        let b = self.bytes();
        match (b.get(self.pos)?, b.get(self.pos + 1)) {
            (b'\'' | b'"', _) => Some((0, false)),
            (b'u' | b'U', Some(b'\'' | b'"')) => Some((1, false)),
            (b'r' | b'R', Some(b'\'' | b'"')) => Some((1, true)),
            _ => None,
        }
    }

    /// One or more adjacent string literals, concatenated.
    fn strings(&mut self) -> Option<Value> {
        let mut out = String::new();
        while let Some((prefix, raw)) = self.string_start() {
            self.pos += prefix;
            self.quoted(raw, &mut out)?;
            let after = self.pos;
            self.ws();
            if self.string_start().is_none() {
                self.pos = after;
                break;
            }
        }
        Some(Value::String(out))
    }

    fn quoted(&mut self, raw: bool, out: &mut String) -> Option<()> {
        let q = char::from(self.peek()?);
        let triple_quote: String = std::iter::repeat_n(q, 3).collect();
        let triple = self.src[self.pos..].starts_with(&triple_quote);
        let qlen = if triple { 3 } else { 1 };
        self.pos += qlen;
        let rest = &self.src[self.pos..];
        let mut chars = rest.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == q && (!triple || rest[i..].starts_with(&triple_quote)) {
                self.pos += i + qlen;
                return Some(());
            }
            match c {
                '\n' if !triple => return None,
                '\\' => {
                    let (_, e) = chars.next()?;
                    if raw {
                        out.push('\\');
                        out.push(e);
                        continue;
                    }
                    match e {
                        '\n' => {}
                        '\\' | '\'' | '"' => out.push(e),
                        'a' => out.push('\x07'),
                        'b' => out.push('\x08'),
                        'f' => out.push('\x0c'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'v' => out.push('\x0b'),
                        '0'..='7' => {
                            let mut v = e.to_digit(8)?;
                            for _ in 0..2 {
                                match chars.peek().and_then(|&(_, d)| d.to_digit(8)) {
                                    Some(d) => {
                                        v = v * 8 + d;
                                        chars.next();
                                    }
                                    None => break,
                                }
                            }
                            out.push(char::from_u32(v)?);
                        }
                        'x' | 'u' | 'U' => {
                            let n = match e {
                                'x' => 2,
                                'u' => 4,
                                _ => 8,
                            };
                            let mut v: u32 = 0;
                            for _ in 0..n {
                                let (_, h) = chars.next()?;
                                v = v * 16 + h.to_digit(16)?;
                            }
                            out.push(char::from_u32(v)?);
                        }
                        // `\N{NAME}` would need Unicode's name table.
                        'N' => return None,
                        other => {
                            out.push('\\');
                            out.push(other);
                        }
                    }
                }
                c => out.push(c),
            }
        }
        None
    }

    fn number(&mut self) -> Option<Value> {
        let b = self.bytes();
        let start = self.pos;
        let at = |i: usize| b.get(i).copied();
        if at(start) == Some(b'0')
            && let Some(r @ (b'x' | b'X' | b'o' | b'O' | b'b' | b'B')) = at(start + 1)
        {
            let radix = match r.to_ascii_lowercase() {
                b'x' => 16,
                b'o' => 8,
                _ => 2,
            };
            let mut end = start + 2;
            while let Some(c) = at(end)
                && (c.is_ascii_alphanumeric() || c == b'_')
            {
                end += 1;
            }
            self.pos = end;
            let digits = &self.src[start + 2..end];
            // `0x_ff` is valid: one `_` may follow the prefix.
            let digits = digits.strip_prefix('_').unwrap_or(digits);
            return int_value(digits, radix);
        }
        let digit_run = |mut i: usize| {
            while let Some(c) = at(i)
                && (c.is_ascii_digit() || c == b'_')
            {
                i += 1;
            }
            i
        };
        let mut end = digit_run(start);
        let int_end = end;
        let mut is_float = false;
        if at(end) == Some(b'.') {
            is_float = true;
            end = digit_run(end + 1);
        }
        if let Some(b'e' | b'E') = at(end) {
            let mut e = end + 1;
            if let Some(b'+' | b'-') = at(e) {
                e += 1;
            }
            let e_end = digit_run(e);
            if e_end == e {
                return None;
            }
            is_float = true;
            end = e_end;
        }
        // `1j`, `1abc`, `1.2.3`: not a plain number literal.
        if let Some(c) = at(end)
            && (c.is_ascii_alphanumeric() || c == b'_' || c == b'.')
        {
            return None;
        }
        self.pos = end;
        let token = &self.src[start..end];
        if !underscores_ok(token, 10) {
            return None;
        }
        if is_float {
            if !token.bytes().any(|c| c.is_ascii_digit()) || token.starts_with('_') {
                return None;
            }
            let cleaned: String = token.chars().filter(|&c| c != '_').collect();
            let f: f64 = cleaned.parse().ok()?;
            Number::from_f64(f).map(Value::Number)
        } else {
            let digits = &self.src[start..int_end];
            // Python rejects `01`, accepts `0` and `00`.
            if digits.len() > 1 && digits.starts_with('0') && digits.bytes().any(|c| matches!(c, b'1'..=b'9')) {
                return None;
            }
            int_value(digits, 10)
        }
    }
}

/// Every `_` sits between two digits of `radix`.
fn underscores_ok(token: &str, radix: u32) -> bool {
    let digit = |c: Option<&u8>| c.is_some_and(|&c| char::from(c).is_digit(radix));
    let b = token.as_bytes();
    b.iter().enumerate().all(|(i, &c)| c != b'_' || (i > 0 && digit(b.get(i - 1)) && digit(b.get(i + 1))))
}

/// Digits in `radix` with `_` separators (already validated for decimal) → a JSON integer.
fn int_value(digits: &str, radix: u32) -> Option<Value> {
    if digits.is_empty() || !underscores_ok(digits, radix) {
        return None;
    }
    let mut v: i128 = 0;
    for c in digits.chars().filter(|&c| c != '_') {
        v = v.checked_mul(i128::from(radix))?.checked_add(i128::from(c.to_digit(radix)?))?;
    }
    int_to_value(v)
}

pub(crate) fn int_to_value(v: i128) -> Option<Value> {
    if let Ok(i) = i64::try_from(v) { Some(Value::from(i)) } else { u64::try_from(v).ok().map(Value::from) }
}

/// Unary `+`/`-`: numbers only (as in `literal_eval`).
fn signed(v: Value, negative: bool) -> Option<Value> {
    let Value::Number(n) = v else { return None };
    if !negative {
        return Some(Value::Number(n));
    }
    if let Some(i) = n.as_i64() {
        int_to_value(-i128::from(i))
    } else if let Some(u) = n.as_u64() {
        int_to_value(-i128::from(u))
    } else {
        Number::from_f64(-n.as_f64()?).map(Value::Number)
    }
}

/// A dict key as `json.dumps` writes it: strings as is, numbers, `true`/`false`/`null`.
fn dict_key(v: Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Null => Some("null".to_owned()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::literal_eval;
    use serde_json::json;

    #[test]
    fn scalars() {
        assert_eq!(literal_eval("True"), Some(json!(true)));
        assert_eq!(literal_eval(" False "), Some(json!(false)));
        assert_eq!(literal_eval("None"), Some(json!(null)));
        assert_eq!(literal_eval("42"), Some(json!(42)));
        assert_eq!(literal_eval("-7"), Some(json!(-7)));
        assert_eq!(literal_eval("1_000"), Some(json!(1000)));
        assert_eq!(literal_eval("0x_ff"), Some(json!(255)));
        assert_eq!(literal_eval("0o17"), Some(json!(15)));
        assert_eq!(literal_eval("0b101"), Some(json!(5)));
        assert_eq!(literal_eval("2.5"), Some(json!(2.5)));
        assert_eq!(literal_eval("-.5e1"), Some(json!(-5.0)));
        assert_eq!(literal_eval("00"), Some(json!(0)));
        assert_eq!(literal_eval("-9223372036854775808"), Some(json!(i64::MIN)));
        assert_eq!(literal_eval("18446744073709551615"), Some(json!(u64::MAX)));
    }

    #[test]
    fn strings() {
        assert_eq!(literal_eval("'it''s'"), Some(json!("its")));
        assert_eq!(literal_eval(r#"'a\'b' "c""#), Some(json!("a'bc")));
        assert_eq!(literal_eval(r"'tab\tnl\n\x41\u00e9\101\q'"), Some(json!("tab\tnl\nAéA\\q")));
        assert_eq!(literal_eval(r"r'C:\dir\n'"), Some(json!("C:\\dir\\n")));
        assert_eq!(literal_eval("u'ünï'"), Some(json!("ünï")));
        assert_eq!(literal_eval("'''multi\nline'''"), Some(json!("multi\nline")));
        assert_eq!(literal_eval("\"\"\"has \" inside\"\"\""), Some(json!("has \" inside")));
    }

    #[test]
    fn containers() {
        assert_eq!(
            literal_eval("{'city': 'Paris', 'days': 3, 'ok': True, 'x': None}"),
            Some(json!({"city": "Paris", "days": 3, "ok": true, "x": null}))
        );
        assert_eq!(literal_eval("[1, (2, 3), [], (), (4,), {}]"), Some(json!([1, [2, 3], [], [], [4], {}])));
        assert_eq!(literal_eval("1, 2,"), Some(json!([1, 2])));
        assert_eq!(literal_eval("(5)"), Some(json!(5)));
        assert_eq!(
            literal_eval("{1: 'a', 2.5: 'b', True: 'c', None: 'd'}"),
            Some(json!({"1": "a", "2.5": "b", "true": "c", "null": "d"}))
        );
        assert_eq!(literal_eval("{'a': 1, 'a': 2}"), Some(json!({"a": 2})));
        assert_eq!(literal_eval("[\n  1,\n  2,\n]"), Some(json!([1, 2])));
    }

    #[test]
    fn rejects() {
        for bad in [
            "",
            "Paris",
            "hello world",
            "1 2",
            "[1,",
            "[1 2]",
            "{'a' 1}",
            "{1, 2}",
            "b'x'",
            "f'x'",
            "1j",
            "01",
            "1__0",
            "1_",
            "_1",
            "1e_5",
            "1_.5",
            "'unterminated",
            "'a\nb'",
            "-'a'",
            "-True",
            "{(1, 2): 3}",
            "1e999",
            "nan",
            "'\\N{BULLET}'",
            "0x",
            "1.2.3",
            "[,]",
            "{,}",
            "(,)",
            "99999999999999999999999",
        ] {
            assert_eq!(literal_eval(bad), None, "{bad:?}");
        }
        let deep = "[".repeat(500) + &"]".repeat(500);
        assert_eq!(literal_eval(&deep), None);
        let ok = "[".repeat(50) + &"]".repeat(50);
        assert!(literal_eval(&ok).is_some());
    }
}
