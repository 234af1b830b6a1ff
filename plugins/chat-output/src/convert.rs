//! The request's tools list, and turning a tool-call argument's text into a JSON value by the
//! type its JSON schema gives it: vLLM's `Qwen3CoderToolParser._convert_param_value` and
//! `Glm4MoeModelToolParser` (`_is_string_type` + `_deserialize`).

use serde_json::{Map, Number, Value};

use crate::pylit::literal_eval;

/// `[{"type": "function", "function": {"name": .., "parameters": <schema>}}]`, reduced to
/// `(name, parameters)`. A flat `{"name": .., "parameters": ..}` entry (the Responses API's
/// shape) is taken too; entries without a name are skipped.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tools {
    list: Vec<(String, Option<Value>)>,
}

impl Tools {
    pub(crate) fn new(tools: Option<&Value>) -> Self {
        let list = tools
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|tool| {
                        let function = tool.get("function").filter(|f| f.is_object()).unwrap_or(tool);
                        let name = function.get("name")?.as_str()?;
                        let parameters = function.get("parameters").filter(|p| !p.is_null()).cloned();
                        Some((name.to_owned(), parameters))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self { list }
    }

    /// `parameters` (a JSON schema) of the first tool called `name`.
    pub(crate) fn parameters(&self, name: &str) -> Option<&Value> {
        self.list.iter().find(|(n, _)| n == name)?.1.as_ref()
    }

    /// The tools' names, in order.
    pub(crate) fn names(&self) -> Vec<&str> {
        self.list.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// `parameters.required` of the first tool called `name`.
    pub(crate) fn required(&self, name: &str) -> Vec<&str> {
        let Some((_, Some(parameters))) = self.list.iter().find(|(n, _)| n == name) else { return Vec::new() };
        parameters.get("required").and_then(Value::as_array).map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
    }

    /// `parameters.properties` of the first tool called `name` (vLLM's `find_tool_properties`).
    pub(crate) fn properties(&self, name: &str) -> Option<&Map<String, Value>> {
        let (_, parameters) = self.list.iter().find(|(n, _)| n == name)?;
        parameters.as_ref()?.get("properties")?.as_object()
    }

    /// GLM's `_is_string_type`: the schema says exactly `"type": "string"` for this argument.
    pub(crate) fn is_string_arg(&self, tool: &str, arg: &str) -> bool {
        self.properties(tool).and_then(|p| p.get(arg)).and_then(|schema| schema.get("type")).and_then(Value::as_str)
            == Some("string")
    }
}

/// A GLM `<arg_value>`: kept verbatim when the schema says string, else JSON-decoded, else
/// Python-literal-decoded, else the (whitespace-trimmed) text.
pub(crate) fn glm_value(raw: &str, is_string: bool) -> Value {
    if is_string {
        return Value::String(raw.to_owned());
    }
    let text = raw.trim();
    serde_json::from_str(text).ok().or_else(|| literal_eval(text)).unwrap_or_else(|| Value::String(text.to_owned()))
}

const STRING_TYPES: [&str; 6] = ["string", "str", "text", "varchar", "char", "enum"];

/// The lower-cased primary type of a property schema and whether it admits `null`:
/// `"type": "x"`, `"type": [..]` or `"anyOf": [{"type": ..}, ..]` (first non-null type wins),
/// else `"string"`.
fn schema_type(schema: &Value) -> (String, bool) {
    let name = |t: &Value| t.as_str().map(|s| s.trim().to_lowercase());
    let pick = |types: &mut dyn Iterator<Item = String>| {
        let mut primary = None;
        let mut nullable = false;
        for t in types {
            if t == "null" {
                nullable = true;
            } else if primary.is_none() {
                primary = Some(t);
            }
        }
        match primary {
            Some(t) => (t, nullable),
            None if nullable => ("null".to_owned(), true),
            None => ("string".to_owned(), false),
        }
    };
    match (schema.get("type"), schema.get("anyOf")) {
        (Some(Value::Array(types)), _) => pick(&mut types.iter().filter_map(name)),
        (Some(t), _) => {
            let t = name(t).unwrap_or_default();
            let nullable = t == "null";
            (t, nullable)
        }
        (None, Some(Value::Array(options))) => pick(&mut options.iter().filter_map(|o| o.get("type")).filter_map(name)),
        _ => ("string".to_owned(), false),
    }
}

fn is_null_word(s: &str) -> bool {
    let lower = s.to_lowercase();
    lower == "null" || lower == "none"
}

/// A Qwen3-Coder `<parameter=..>` value (one leading/trailing newline already stripped),
/// converted by its property schema (`None`: parameter unknown or tool unknown → string).
pub(crate) fn qwen_value(raw: &str, schema: Option<&Value>) -> Value {
    let keep = || Value::String(raw.to_owned());
    let Some(schema) = schema else { return keep() };
    let (ty, nullable) = schema_type(schema);
    if nullable && is_null_word(raw) {
        return Value::Null;
    }
    if STRING_TYPES.contains(&ty.as_str()) {
        return keep();
    }
    if is_null_word(raw) {
        return Value::Null;
    }
    if ["int", "uint", "long", "short", "unsigned"].iter().any(|p| ty.starts_with(p)) {
        return py_int(raw).unwrap_or_else(keep);
    }
    if ty.starts_with("num") || ty.starts_with("float") {
        return py_float(raw).map_or_else(keep, number_value);
    }
    if ["boolean", "bool", "binary"].contains(&ty.as_str()) {
        // vLLM maps anything but "true" to false; a value that is neither stays a string here.
        return match raw.to_lowercase().as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => keep(),
        };
    }
    let container =
        ["object", "array", "arr"].contains(&ty.as_str()) || ty.starts_with("dict") || ty.starts_with("list");
    // A JSON string holding a Python repr (`"{'k': 'v'}"`) comes from models trained on a
    // template that did `json.dumps(str(dict))`: decode once more.
    let redecode = |v: Value| match v {
        Value::String(s) if container => literal_eval(&s).unwrap_or(Value::String(s)),
        v => v,
    };
    if container && let Ok(v) = serde_json::from_str::<Value>(raw) {
        return redecode(v);
    }
    literal_eval(raw).map_or_else(keep, redecode)
}

/// Python's `int(s)`: surrounding whitespace, a sign, `_` between digits, leading zeros.
fn py_int(s: &str) -> Option<Value> {
    let s = s.trim();
    let (negative, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.split('_').all(|run| !run.is_empty() && run.bytes().all(|c| c.is_ascii_digit())) {
        return None;
    }
    let mut v: i128 = 0;
    for c in digits.bytes().filter(u8::is_ascii_digit) {
        v = v.checked_mul(10)?.checked_add(i128::from(c - b'0'))?;
    }
    crate::pylit::int_to_value(if negative { -v } else { v })
}

/// Python's `float(s)`, finite values only (JSON has no `inf`/`nan`).
fn py_float(s: &str) -> Option<f64> {
    let s = s.trim();
    let b = s.as_bytes();
    let underscores_ok = b.iter().enumerate().all(|(i, &c)| {
        c != b'_' || (i > 0 && b[i - 1].is_ascii_digit() && b.get(i + 1).is_some_and(u8::is_ascii_digit))
    });
    if !underscores_ok {
        return None;
    }
    let cleaned: String = s.chars().filter(|&c| c != '_').collect();
    let f: f64 = cleaned.parse().ok()?;
    f.is_finite().then_some(f)
}

/// vLLM: `f if f - int(f) != 0 else int(f)`; integers too large for 64 bits stay floats.
fn number_value(f: f64) -> Value {
    const LIMIT: f64 = 9_223_372_036_854_775_808.0; // 2^63
    if f.fract() == 0.0 && f.abs() < LIMIT {
        #[allow(clippy::cast_possible_truncation)]
        return Value::from(f as i64);
    }
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(raw: &str, schema: Value) -> Value {
        qwen_value(raw, Some(&schema))
    }

    #[test]
    fn qwen_string_and_unknown() {
        assert_eq!(q("Paris", json!({"type": "string"})), json!("Paris"));
        assert_eq!(q("42", json!({"type": "string"})), json!("42"));
        assert_eq!(q("null", json!({"type": "string"})), json!("null"));
        assert_eq!(q("42", json!({"type": "enum"})), json!("42"));
        assert_eq!(q("42", json!({"description": "no type"})), json!("42"));
        assert_eq!(q("42", json!("not an object")), json!("42"));
        assert_eq!(qwen_value("42", None), json!("42"));
        assert_eq!(qwen_value("null", None), json!("null"));
    }

    #[test]
    fn qwen_integers() {
        let int = json!({"type": "integer"});
        assert_eq!(q("3", int.clone()), json!(3));
        assert_eq!(q(" -12 ", int.clone()), json!(-12));
        assert_eq!(q("1_000", int.clone()), json!(1000));
        assert_eq!(q("007", int.clone()), json!(7));
        assert_eq!(q("3.5", int.clone()), json!("3.5"));
        assert_eq!(q("three", int.clone()), json!("three"));
        assert_eq!(q("1__0", int.clone()), json!("1__0"));
        assert_eq!(q("null", int.clone()), json!(null));
        assert_eq!(q("None", int.clone()), json!(null));
        assert_eq!(q("99999999999999999999999", int), json!("99999999999999999999999"));
        assert_eq!(q("5", json!({"type": "int"})), json!(5));
        assert_eq!(q("5", json!({"type": "uint64"})), json!(5));
    }

    #[test]
    fn qwen_numbers() {
        let num = json!({"type": "number"});
        assert_eq!(q("2.5", num.clone()), json!(2.5));
        assert_eq!(q("3.0", num.clone()), json!(3));
        assert_eq!(q("1e3", num.clone()), json!(1000));
        assert_eq!(q("-0.25", num.clone()), json!(-0.25));
        assert_eq!(q("1e20", num.clone()), json!(1e20));
        assert_eq!(q("inf", num.clone()), json!("inf"));
        assert_eq!(q("abc", num), json!("abc"));
        assert_eq!(q("7", json!({"type": "float"})), json!(7));
    }

    #[test]
    fn qwen_booleans() {
        let b = json!({"type": "boolean"});
        assert_eq!(q("true", b.clone()), json!(true));
        assert_eq!(q("FALSE", b.clone()), json!(false));
        assert_eq!(q("True", json!({"type": "bool"})), json!(true));
        assert_eq!(q("yes", b), json!("yes"));
    }

    #[test]
    fn qwen_containers() {
        let obj = json!({"type": "object"});
        let arr = json!({"type": "array"});
        assert_eq!(q(r#"{"a": [1, {"b": null}]}"#, obj.clone()), json!({"a": [1, {"b": null}]}));
        assert_eq!(q("{'a': True, 'b': None}", obj.clone()), json!({"a": true, "b": null}));
        assert_eq!(q(r#""{'k': 'v'}""#, obj.clone()), json!({"k": "v"}));
        assert_eq!(q("{not json", obj), json!("{not json"));
        assert_eq!(q("[1, \"two\", [3]]", arr.clone()), json!([1, "two", [3]]));
        assert_eq!(q("(1, 2)", arr.clone()), json!([1, 2]));
        assert_eq!(q("[1, 2", arr), json!("[1, 2"));
        assert_eq!(q("[1]", json!({"type": "List[int]"})), json!([1]));
        // Not a container type: literal_eval only (no JSON first), as vLLM.
        assert_eq!(q("[1]", json!({"type": "tuple"})), json!([1]));
        assert_eq!(q("hello", json!({"type": "tuple"})), json!("hello"));
    }

    #[test]
    fn qwen_null_and_unions() {
        assert_eq!(q("null", json!({"type": "null"})), json!(null));
        assert_eq!(q("abc", json!({"type": "null"})), json!("abc"));
        let opt_int = json!({"type": ["integer", "null"]});
        assert_eq!(q("7", opt_int.clone()), json!(7));
        assert_eq!(q("null", opt_int.clone()), json!(null));
        assert_eq!(q("x", opt_int), json!("x"));
        let opt_str = json!({"anyOf": [{"type": "string"}, {"type": "null"}]});
        assert_eq!(q("None", opt_str.clone()), json!(null));
        assert_eq!(q("42", opt_str), json!("42"));
        assert_eq!(q("42", json!({"anyOf": [{"type": "null"}, {"type": "integer"}]})), json!(42));
    }

    #[test]
    fn glm_values() {
        assert_eq!(glm_value(" padded ", true), json!(" padded "));
        assert_eq!(glm_value("3", true), json!("3"));
        assert_eq!(glm_value(" 3 ", false), json!(3));
        assert_eq!(glm_value("2.5", false), json!(2.5));
        assert_eq!(glm_value("true", false), json!(true));
        assert_eq!(glm_value("True", false), json!(true));
        assert_eq!(glm_value("null", false), json!(null));
        assert_eq!(glm_value(r#"{"a": [1, 2]}"#, false), json!({"a": [1, 2]}));
        assert_eq!(glm_value("{'a': None}", false), json!({"a": null}));
        assert_eq!(glm_value(" Paris ", false), json!("Paris"));
        assert_eq!(glm_value("[1, 2", false), json!("[1, 2"));
    }

    #[test]
    fn tools_lookup() {
        let tools = json!([
            {"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {"s": {"type": "string"}, "n": {"type": "integer"}}}}},
            {"type": "function", "function": {"name": "nop"}},
            {"name": "flat", "parameters": {"properties": {"s": {"type": "string"}}}},
            {"type": "function", "function": {"name": "a", "parameters": {"properties": {}}}},
            {"type": "function"},
        ]);
        let t = Tools::new(Some(&tools));
        assert!(t.is_string_arg("a", "s"));
        assert!(!t.is_string_arg("a", "n"));
        assert!(!t.is_string_arg("a", "missing"));
        assert!(!t.is_string_arg("nop", "s"));
        assert!(t.is_string_arg("flat", "s"));
        assert!(!t.is_string_arg("unknown", "s"));
        assert_eq!(t.properties("a").map(Map::len), Some(2));
        assert!(t.properties("nop").is_none());
        assert!(Tools::new(None).properties("a").is_none());
        assert!(Tools::new(Some(&json!(null))).properties("a").is_none());
    }
}
