//! The page a person reads instead of `report.json`: `inference-pio bench`'s report as one
//! self-contained HTML file (no scripts, no external files), its tables built from the JSON
//! report and its plots drawn as inline SVG by `plotters`.

use plotters::prelude::*;
use serde_json::Value;
use std::fmt::Write;

/// `text` with HTML's special characters escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as a table cell: numbers to 4 significant figures, null as an en dash.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::Number(n) => match n.as_f64() {
            Some(x) if n.is_f64() => {
                if x == 0.0 {
                    "0".into()
                } else if (1e-3..1e6).contains(&x.abs()) {
                    let digits = (3 - x.abs().log10().floor() as i32).clamp(0, 6) as usize;
                    format!("{x:.digits$}")
                } else {
                    format!("{x:.3e}")
                }
            }
            _ => n.to_string(),
        },
        Value::String(s) => escape(s),
        Value::Bool(b) => b.to_string(),
        other => escape(&other.to_string()),
    }
}

/// A table of `rows` (JSON objects) over `columns` (key, heading).
fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let mut out = String::from("<table><tr>");
    for (_, heading) in columns {
        let _ = write!(out, "<th>{}</th>", escape(heading));
    }
    out.push_str("</tr>");
    for row in rows {
        out.push_str("<tr>");
        for (key, _) in columns {
            let _ = write!(out, "<td>{}</td>", cell(row.get(*key).unwrap_or(&Value::Null)));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table>");
    out
}

/// A key/value table of an object's scalar fields.
fn fields(object: &Value) -> String {
    let mut out = String::from("<table>");
    if let Some(map) = object.as_object() {
        for (k, v) in map {
            if !v.is_object() && !v.is_array() {
                let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", escape(k), cell(v));
            }
        }
    }
    out.push_str("</table>");
    out
}

/// A line chart (points marked) of named series as an SVG element; a note instead when
/// there is nothing to draw or plotters fails.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if points.is_empty() {
        return format!("<p>{}: nothing to plot.</p>", escape(title));
    }
    let (mut x0, mut x1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let y1 = points.iter().fold(0.0f64, |m, p| m.max(p.1));
    if x1 <= x0 {
        (x0, x1) = (x0 - 1.0, x1 + 1.0);
    }
    let pad = (x1 - x0) * 0.05;
    let (x0, x1, y1) = (x0 - pad, x1 + pad, if y1 > 0.0 { y1 * 1.1 } else { 1.0 });
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut svg, (640, 320)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0.0..y1)?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        if series.len() > 1 {
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        }
        root.present()?;
        Ok(())
    })();
    match drawn {
        Ok(()) => svg,
        Err(e) => format!("<p>{}: the plot failed ({}).</p>", escape(title), escape(&e.to_string())),
    }
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn series_of(rows: &[Value], x: &str, y: &str, scale: f64) -> Vec<(f64, f64)> {
    rows.iter().filter_map(|r| Some((num(r, x)?, num(r, y)? * scale))).collect()
}

fn array<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// The whole page for `report` (what `bench::run` writes as `report.json`).
pub fn html(report: &Value) -> String {
    let mut body = String::new();
    let title = format!(
        "inference-pio bench: {} on {}",
        report.pointer("/plugin/id").and_then(Value::as_str).unwrap_or("?"),
        report.pointer("/model/info/device").and_then(Value::as_str).unwrap_or("?")
    );
    let _ = write!(body, "<h1>{}</h1>", escape(&title));
    let passed = report.get("passed").and_then(Value::as_bool).unwrap_or(false);
    let _ = write!(body, "<p class=\"{}\">{}</p>", if passed { "ok" } else { "fail" }, if passed { "Every check passed." } else { "A check failed (see the memory suite's leak check)." });
    body.push_str("<h2>Run</h2>");
    body.push_str(&fields(report));
    body.push_str("<h2>Machine</h2>");
    body.push_str(&fields(&report["machine"]));
    let gpus = array(&report["machine"], "gpus");
    if !gpus.is_empty() {
        body.push_str(&table(gpus, &[("index", "GPU"), ("name", "name"), ("memory_bytes", "memory (bytes)")]));
    }
    body.push_str("<h2>Plugin and model</h2>");
    body.push_str(&fields(&report["plugin"]));
    body.push_str(&fields(&report["model"]["info"]));
    body.push_str("<h2>Settings</h2>");
    body.push_str(&fields(&report["settings"]));
    body.push_str(&fields(&report["load_options"]));
    let suites = &report["suites"];
    if let Some(speed) = suites.get("speed") {
        body.push_str("<h2>Speed</h2>");
        let cases = array(speed, "cases");
        body.push_str(&table(
            cases,
            &[
                ("kind", "case"),
                ("prompt_tokens", "prompt tokens"),
                ("new_tokens", "new tokens"),
                ("time_to_first_token_s", "time to first token (s)"),
                ("prefill_tokens_per_s", "prefill tok/s"),
                ("decode_tokens_per_s", "decode tok/s"),
                ("steady_decode_tokens_per_s", "steady decode tok/s"),
                ("skipped", "skipped"),
            ],
        ));
        let prompts: Vec<Value> = cases.iter().filter(|c| c["kind"] == "prompt").cloned().collect();
        body.push_str(&line_chart("Time to first token", "prompt tokens", "ms", &[("time to first token".into(), series_of(&prompts, "prompt_tokens", "time_to_first_token_s", 1e3))]));
        body.push_str(&line_chart(
            "Decode rate by prompt length",
            "prompt tokens",
            "tokens/s",
            &[("decode".into(), series_of(&prompts, "prompt_tokens", "decode_tokens_per_s", 1.0)), ("steady decode".into(), series_of(&prompts, "prompt_tokens", "steady_decode_tokens_per_s", 1.0))],
        ));
    }
    if let Some(t) = suites.get("throughput") {
        body.push_str("<h2>Throughput</h2><h3>Sequential</h3>");
        body.push_str(&fields(&t["sequential"]));
        body.push_str("<h3>Batches (<code>infer_batch</code>)</h3>");
        let batch = array(t, "batch");
        body.push_str(&table(batch, &[("rows", "rows"), ("wall_s", "wall (s)"), ("output_tokens_per_s", "output tok/s"), ("steady_decode_tokens_per_s", "steady decode tok/s")]));
        body.push_str("<h3>Concurrent requests</h3>");
        let concurrent = array(t, "concurrent");
        body.push_str(&table(
            concurrent,
            &[("requests", "requests"), ("wall_s", "wall (s)"), ("output_tokens_per_s", "output tok/s"), ("mean_time_to_first_token_s", "mean TTFT (s)"), ("p99_time_to_first_token_s", "p99 TTFT (s)")],
        ));
        body.push_str(&line_chart(
            "Output throughput",
            "rows / concurrent requests",
            "tokens/s",
            &[("batch".into(), series_of(batch, "rows", "output_tokens_per_s", 1.0)), ("concurrent".into(), series_of(concurrent, "requests", "output_tokens_per_s", 1.0))],
        ));
        body.push_str("<h3>Sustained load</h3>");
        body.push_str(&fields(&t["sustained"]));
        let windows = array(&t["sustained"], "windows");
        body.push_str(&table(windows, &[("from_s", "from (s)"), ("requests", "requests"), ("p50_latency_s", "p50 latency (s)"), ("p99_latency_s", "p99 latency (s)")]));
        body.push_str(&line_chart(
            "Latency over time at a fixed request rate",
            "seconds into the run",
            "latency (s)",
            &[("p50".into(), series_of(windows, "from_s", "p50_latency_s", 1.0)), ("p99".into(), series_of(windows, "from_s", "p99_latency_s", 1.0))],
        ));
    }
    if let Some(m) = suites.get("memory") {
        body.push_str("<h2>Memory</h2>");
        body.push_str(&fields(m));
        let stages = array(m, "stages");
        body.push_str(&table(stages, &[("stage", "stage"), ("resident_bytes", "resident (bytes)"), ("gpu_bytes", "GPU (bytes)")]));
        body.push_str(&fields(&m["leak_check"]));
        let indexed = |key: &str| stages.iter().enumerate().filter_map(|(i, s)| Some((i as f64, num(s, key)? / (1 << 20) as f64))).collect::<Vec<_>>();
        let names: Vec<String> = stages.iter().enumerate().map(|(i, s)| format!("{i}: {}", s["stage"].as_str().unwrap_or("?"))).collect();
        body.push_str(&line_chart("Memory by stage", &names.join(", "), "MiB", &[("resident".into(), indexed("resident_bytes")), ("GPU".into(), indexed("gpu_bytes"))]));
        let plugins = array(m, "plugins");
        if !plugins.is_empty() {
            body.push_str("<h3>Across plugins</h3><p>Each plugin on its model, measured alike: resident memory of the process that holds \
                the model and its GPU memory, after load, at the peak of a request, after cleanup and after a second load/cleanup cycle.</p>");
            body.push_str(&table(
                plugins,
                &[
                    ("plugin", "plugin"),
                    ("model", "model"),
                    ("process", "process"),
                    ("weight_bytes", "weights (bytes)"),
                    ("after_load_resident_bytes", "resident after load"),
                    ("peak_resident_bytes", "resident peak"),
                    ("after_cleanup_resident_bytes", "resident after cleanup"),
                    ("after_second_cycle_resident_bytes", "resident after a second cycle"),
                    ("after_load_gpu_bytes", "GPU after load"),
                    ("peak_gpu_bytes", "GPU peak"),
                    ("after_cleanup_gpu_bytes", "GPU after cleanup"),
                    ("leak_check_passed", "leak check passed"),
                ],
            ));
        }
    }
    if let Some(o) = suites.get("optimization") {
        body.push_str("<h2>Optimization impact</h2><p>Each variant loads the model its own way and is measured the same way: \
            a single request, concurrent requests sharing half their prompt, peak memory, and the evaluation texts teacher-forced \
            against the first (most exact) variant.</p>");
        let variants = array(o, "variants");
        let first = variants.first().map(|r| r["variant"].clone()).unwrap_or(Value::Null);
        let rows: Vec<Value> = variants
            .iter()
            .map(|r| {
                let mut flat = r.clone();
                let d = &r["divergence_from_most_exact"];
                flat["mean_kl"] = d["mean_kl"].clone();
                flat["top1_agreement"] = d["top1_agreement"].clone();
                // Divergence from another variant than the first (which did not run).
                let against = r["divergence_reference"].as_str().filter(|name| first.as_str() != Some(*name));
                let notes: Vec<String> = ["refused", "load_error", "score_error"]
                    .iter()
                    .filter(|k| !r[**k].is_null())
                    .map(|k| format!("{k}: {}", r[*k].as_str().map_or_else(|| r[*k].to_string(), String::from)))
                    .chain(d["error"].as_str().map(|e| format!("divergence: {e}")))
                    .chain(against.map(|name| format!("KL and top-1 against {name}")))
                    .collect();
                flat["notes"] = Value::String(notes.join("; "));
                flat
            })
            .collect();
        body.push_str(&table(
            &rows,
            &[
                ("variant", "variant"),
                ("dtype", "dtype"),
                ("quantization", "stored quantized"),
                ("weight_bytes", "weights (bytes)"),
                ("time_to_first_token_s", "TTFT (s)"),
                ("decode_tokens_per_s", "decode tok/s"),
                ("concurrent_output_tokens_per_s", "concurrent output tok/s"),
                ("concurrent_mean_time_to_first_token_s", "concurrent mean TTFT (s)"),
                ("peak_resident_bytes", "peak resident (bytes)"),
                ("peak_gpu_bytes", "peak GPU (bytes)"),
                ("perplexity", "perplexity"),
                ("mean_kl", "mean KL (nats)"),
                ("top1_agreement", "top-1 agreement"),
                ("evaluated_on", "evaluated on"),
                ("notes", "notes"),
            ],
        ));
        body.push_str(&table(array(o, "built_in"), &[("optimization", "not switched"), ("why_not_switched", "why")]));
        let names: Vec<String> = rows.iter().enumerate().map(|(i, r)| format!("{i}: {}", r["variant"].as_str().unwrap_or("?"))).collect();
        let indexed = |key: &str| rows.iter().enumerate().filter_map(|(i, r)| Some((i as f64, num(r, key)?))).collect::<Vec<_>>();
        body.push_str(&line_chart(
            "Speed by variant",
            &names.join(", "),
            "tokens/s",
            &[("decode (single request)".into(), indexed("decode_tokens_per_s")), ("concurrent output".into(), indexed("concurrent_output_tokens_per_s"))],
        ));
        body.push_str(&line_chart("Divergence from the most exact variant", &names.join(", "), "mean KL (nats)", &[("mean KL".into(), indexed("mean_kl"))]));
    }
    if let Some(a) = suites.get("accuracy") {
        body.push_str("<h2>Accuracy</h2>");
        body.push_str(&fields(a));
        body.push_str(&fields(&a["divergence_of_chosen"]));
        let r = &a["transformers_reference"];
        if r.is_object() {
            body.push_str("<h3>Against the transformers reference</h3>");
            body.push_str(&fields(r));
            body.push_str(&table(
                array(r, "prompts"),
                &[
                    ("prompt_tokens", "prompt tokens"),
                    ("last_logits_relative_l2", "last logits, relative L2"),
                    ("greedy_tokens", "greedy tokens"),
                    ("greedy_tokens_matching", "matching"),
                ],
            ));
        }
    }
    if let Some(p) = suites.get("power") {
        body.push_str("<h2>Power</h2><h3>Idle</h3>");
        body.push_str(&fields(&p["idle"]));
        body.push_str("<h3>Generating</h3>");
        body.push_str(&fields(&p["generating"]));
    }
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title><style>\
         body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:0.5em 0}}th,td{{border:1px solid #ccc;padding:0.2em 0.5em;text-align:left}}\
         th{{background:#f4f4f4}}.ok{{color:#060}}.fail{{color:#a00;font-weight:bold}}svg{{display:block;margin:1em 0}}\
         </style></head><body>{}</body></html>\n",
        escape(&title),
        body
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_is_escaped_and_numbers_rounded() {
        assert_eq!(escape("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(cell(&json!(1234.5678)), "1235");
        assert_eq!(cell(&json!(0.012345)), "0.01235");
        assert_eq!(cell(&json!(12)), "12");
        assert_eq!(cell(&json!(null)), "–");
        assert_eq!(cell(&json!(0.0)), "0");
        assert_eq!(cell(&json!(2.5e-7)), "2.500e-7");
    }

    #[test]
    fn a_chart_is_an_svg_with_its_title_and_series() {
        let svg = line_chart("Decode rate", "prompt tokens", "tokens/s", &[("decode".into(), vec![(20.0, 100.0), (50.0, 90.0)]), ("steady".into(), vec![(20.0, 110.0)])]);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("Decode rate") && svg.contains("prompt tokens"), "title and axis");
        assert!(svg.contains("steady"), "legend");
        assert!(line_chart("Empty", "x", "y", &[]).contains("nothing to plot"));
    }

    #[test]
    fn the_page_holds_every_suite_given() {
        let report = json!({
            "passed": false, "commit": "abc1234", "plugin": {"id": "llama"}, "model": {"info": {"device": "cpu"}},
            "suites": {
                "speed": {"cases": [{"kind": "prompt", "prompt_tokens": 20, "new_tokens": 16, "time_to_first_token_s": 0.01, "decode_tokens_per_s": 50.0}]},
                "memory": {
                    "stages": [{"stage": "baseline", "resident_bytes": 1048576, "gpu_bytes": 0}], "leak_check": {"passed": false},
                    "plugins": [{"plugin": "llama", "model": "m", "peak_resident_bytes": 2097152}, {"plugin": "glm-4-7", "model": "g", "peak_resident_bytes": 3145728}],
                },
            }
        });
        let page = html(&report);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.contains("<h2>Speed</h2>") && page.contains("<h2>Memory</h2>"));
        assert!(page.contains("<h3>Across plugins</h3>") && page.contains("glm-4-7") && page.contains("resident peak"));
        assert!(!page.contains("<h2>Power</h2>"), "no suite that did not run");
        assert!(page.contains("A check failed"));
        assert!(page.contains("abc1234"));
        assert!(page.matches("<svg").count() >= 3, "two speed plots and the memory plot");
    }
}
