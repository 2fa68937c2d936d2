//! A PromQL evaluator for the expressions our alert rules and dashboard run, over
//! two scrapes of our own `/metrics` text. Parsing is the real grammar
//! (`promql-parser`); evaluation covers what those expressions use: selectors,
//! `rate`/`increase` (the difference of the two scrapes over the range),
//! `histogram_quantile`, `absent`, `sum`/`max`/`min`/`avg`/`count` with
//! `by`/`without`, arithmetic and comparisons (with `on`/`ignoring`, one-to-one),
//! `and`/`or`/`unless`. Anything else is an error, never a silent empty result.

use std::collections::BTreeMap;

use promql_parser::label::Matcher;
use promql_parser::parser::{self, Expr, LabelModifier, VectorSelector};

/// A series' labels, `__name__` included.
pub type Labels = BTreeMap<String, String>;

/// An instant vector.
pub type Vector = Vec<(Labels, f64)>;

/// A value: scalar or instant vector.
#[derive(Debug, Clone)]
pub enum Value {
    Scalar(f64),
    Vector(Vector),
}

/// Two scrapes `range` apart, as Prometheus would hold them.
#[derive(Debug, Clone)]
pub struct Scrapes {
    pub before: Vector,
    pub after: Vector,
}

/// Parses an OpenMetrics/Prometheus text exposition; `extra` labels are added to
/// every series (what Prometheus adds: `job`, `instance`).
pub fn parse_exposition(text: &str, extra: &[(&str, &str)]) -> Vector {
    let mut out = Vector::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            panic!("unparsable sample value in {line:?}");
        };
        let mut labels = Labels::new();
        let name = match series.find('{') {
            Some(i) => {
                let body = series[i + 1..].trim_end_matches('}');
                parse_labels(body, &mut labels);
                &series[..i]
            }
            None => series,
        };
        labels.insert("__name__".into(), name.into());
        for (k, v) in extra {
            labels.insert((*k).into(), (*v).into());
        }
        out.push((labels, value));
    }
    out
}

fn parse_labels(mut body: &str, labels: &mut Labels) {
    while let Some(eq) = body.find("=\"") {
        let key = body[..eq].trim_start_matches(',').trim();
        let rest = &body[eq + 2..];
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.into(), value);
        body = &rest[end..];
    }
}

/// Parses and evaluates `query`.
///
/// # Errors
/// Parse errors and anything this evaluator does not support.
pub fn query(query: &str, s: &Scrapes) -> Result<Value, String> {
    let expr = parser::parse(query).map_err(|e| format!("parse {query:?}: {e}"))?;
    eval(&expr, s)
}

fn eval(expr: &Expr, s: &Scrapes) -> Result<Value, String> {
    match expr {
        Expr::NumberLiteral(n) => Ok(Value::Scalar(n.val)),
        Expr::Paren(p) => eval(&p.expr, s),
        Expr::Unary(u) => match eval(&u.expr, s)? {
            Value::Scalar(v) => Ok(Value::Scalar(-v)),
            Value::Vector(v) => Ok(Value::Vector(
                v.into_iter().map(|(l, x)| (drop_name(l), -x)).collect(),
            )),
        },
        Expr::VectorSelector(vs) => Ok(Value::Vector(select(vs, &s.after))),
        Expr::Call(call) => eval_call(call.func.name, &call.args.args, s),
        Expr::Aggregate(a) => {
            let Value::Vector(v) = eval(&a.expr, s)? else {
                return Err("aggregation over a scalar".into());
            };
            Ok(Value::Vector(aggregate(
                &a.op.to_string(),
                a.modifier.as_ref(),
                v,
            )?))
        }
        Expr::Binary(b) => {
            let lhs = eval(&b.lhs, s)?;
            let rhs = eval(&b.rhs, s)?;
            let op = b.op.to_string();
            let modifier = b.modifier.as_ref();
            let return_bool = modifier.is_some_and(|m| m.return_bool);
            let matching = modifier.and_then(|m| m.matching.as_ref());
            binary(&op, lhs, rhs, return_bool, matching)
        }
        other => Err(format!("unsupported expression: {other}")),
    }
}

fn select(vs: &VectorSelector, from: &Vector) -> Vector {
    let matches = |l: &Labels, m: &Matcher| m.is_match(l.get(&m.name).map_or("", String::as_str));
    from.iter()
        .filter(|(l, _)| {
            vs.name
                .as_ref()
                .is_none_or(|n| l.get("__name__") == Some(n))
        })
        .filter(|(l, _)| vs.matchers.matchers.iter().all(|m| matches(l, m)))
        .filter(|(l, _)| {
            vs.matchers.or_matchers.is_empty()
                || vs
                    .matchers
                    .or_matchers
                    .iter()
                    .any(|group| group.iter().all(|m| matches(l, m)))
        })
        .cloned()
        .collect()
}

fn drop_name(mut l: Labels) -> Labels {
    l.remove("__name__");
    l
}

fn eval_call(name: &str, args: &[Box<Expr>], s: &Scrapes) -> Result<Value, String> {
    match name {
        "rate" | "increase" => {
            let Some(Expr::MatrixSelector(ms)) = args.first().map(|a| a.as_ref()) else {
                return Err(format!("{name} needs a range selector"));
            };
            let range = ms.range.as_secs_f64();
            let before = select(&ms.vs, &s.before);
            let out = select(&ms.vs, &s.after)
                .into_iter()
                .map(|(l, after)| {
                    // A series born between the scrapes started from zero.
                    let b = before
                        .iter()
                        .find(|(bl, _)| *bl == l)
                        .map_or(0.0, |(_, v)| *v);
                    // A counter reset restarts from zero.
                    let inc = if after >= b { after - b } else { after };
                    let v = if name == "rate" { inc / range } else { inc };
                    (drop_name(l), v)
                })
                .collect();
            Ok(Value::Vector(out))
        }
        "histogram_quantile" => {
            let (Some(q), Some(v)) = (args.first(), args.get(1)) else {
                return Err("histogram_quantile needs two arguments".into());
            };
            let Value::Scalar(q) = eval(q, s)? else {
                return Err("histogram_quantile: quantile must be a scalar".into());
            };
            let Value::Vector(v) = eval(v, s)? else {
                return Err("histogram_quantile: needs a vector".into());
            };
            Ok(Value::Vector(histogram_quantile(q, v)?))
        }
        "absent" => {
            let Some(arg) = args.first() else {
                return Err("absent needs an argument".into());
            };
            match eval(arg, s)? {
                Value::Vector(v) if v.is_empty() => Ok(Value::Vector(vec![(Labels::new(), 1.0)])),
                Value::Vector(_) => Ok(Value::Vector(Vec::new())),
                Value::Scalar(_) => Err("absent needs a vector".into()),
            }
        }
        other => Err(format!("unsupported function {other}")),
    }
}

fn histogram_quantile(q: f64, v: Vector) -> Result<Vector, String> {
    let mut groups: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    for (mut l, count) in v {
        let le = l
            .remove("le")
            .ok_or("histogram_quantile: a series without le")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse::<f64>().map_err(|e| format!("le {le}: {e}"))?
        };
        groups.entry(drop_name(l)).or_default().push((le, count));
    }
    let mut out = Vector::new();
    for (labels, mut buckets) in groups {
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.push((labels, bucket_quantile(q, &buckets)));
    }
    Ok(out)
}

/// Prometheus's `bucketQuantile`: linear interpolation inside the bucket holding
/// the rank; the highest finite bound when the rank is in `+Inf`.
fn bucket_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    if !(0.0..=1.0).contains(&q) {
        return if q < 0.0 {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
    }
    let Some(&(last_le, total)) = buckets.last() else {
        return f64::NAN;
    };
    if buckets.len() < 2 || last_le != f64::INFINITY || total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let i = buckets
        .iter()
        .position(|(_, c)| *c >= rank)
        .unwrap_or(buckets.len() - 1);
    if i == buckets.len() - 1 {
        return buckets[buckets.len() - 2].0;
    }
    let (upper, count) = buckets[i];
    let (lower, below) = if i == 0 {
        (0.0_f64.min(upper), 0.0)
    } else {
        buckets[i - 1]
    };
    if i == 0 && upper <= 0.0 {
        return upper;
    }
    lower + (upper - lower) * ((rank - below) / (count - below))
}

fn group_key(l: &Labels, modifier: Option<&LabelModifier>) -> Labels {
    match modifier {
        None => Labels::new(),
        Some(LabelModifier::Include(keep)) => l
            .iter()
            .filter(|(k, _)| keep.labels.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        Some(LabelModifier::Exclude(drop)) => l
            .iter()
            .filter(|(k, _)| *k != "__name__" && !drop.labels.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

fn aggregate(op: &str, modifier: Option<&LabelModifier>, v: Vector) -> Result<Vector, String> {
    let mut groups: BTreeMap<Labels, Vec<f64>> = BTreeMap::new();
    for (l, x) in v {
        groups.entry(group_key(&l, modifier)).or_default().push(x);
    }
    groups
        .into_iter()
        .map(|(l, xs)| {
            let n = xs.len() as f64;
            let v = match op {
                "sum" => xs.iter().sum(),
                "max" => xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                "min" => xs.iter().copied().fold(f64::INFINITY, f64::min),
                "avg" => xs.iter().sum::<f64>() / n,
                "count" => n,
                other => return Err(format!("unsupported aggregation {other}")),
            };
            Ok((l, v))
        })
        .collect()
}

fn arith(op: &str, a: f64, b: f64) -> Result<Option<f64>, String> {
    // Some(value) for arithmetic; for comparisons Some(1/0) = true/false.
    let t = |c: bool| Some(if c { 1.0 } else { 0.0 });
    Ok(match op {
        "+" => Some(a + b),
        "-" => Some(a - b),
        "*" => Some(a * b),
        "/" => Some(a / b),
        ">" => t(a > b),
        "<" => t(a < b),
        ">=" => t(a >= b),
        "<=" => t(a <= b),
        "==" => t(a == b),
        "!=" => t(a != b),
        other => return Err(format!("unsupported operator {other}")),
    })
}

fn is_comparison(op: &str) -> bool {
    matches!(op, ">" | "<" | ">=" | "<=" | "==" | "!=")
}

fn match_key(l: &Labels, matching: Option<&LabelModifier>) -> Labels {
    let l = drop_name(l.clone());
    match matching {
        None => l,
        Some(LabelModifier::Include(on)) => l
            .into_iter()
            .filter(|(k, _)| on.labels.contains(k))
            .collect(),
        Some(LabelModifier::Exclude(ignoring)) => l
            .into_iter()
            .filter(|(k, _)| !ignoring.labels.contains(k))
            .collect(),
    }
}

fn binary(
    op: &str,
    lhs: Value,
    rhs: Value,
    return_bool: bool,
    matching: Option<&LabelModifier>,
) -> Result<Value, String> {
    // One element: lhs value, rhs value -> result, or None to drop the sample.
    let combine = |a: f64, b: f64, keep: f64| -> Result<Option<f64>, String> {
        let r = arith(op, a, b)?;
        if is_comparison(op) && !return_bool {
            return Ok(r.filter(|v| *v == 1.0).map(|_| keep));
        }
        Ok(r)
    };
    match (lhs, rhs) {
        (Value::Scalar(a), Value::Scalar(b)) => {
            Ok(Value::Scalar(arith(op, a, b)?.unwrap_or(f64::NAN)))
        }
        (Value::Vector(v), Value::Scalar(b)) => {
            let mut out = Vector::new();
            for (l, a) in v {
                if let Some(x) = combine(a, b, a)? {
                    out.push((
                        if is_comparison(op) && !return_bool {
                            l
                        } else {
                            drop_name(l)
                        },
                        x,
                    ));
                }
            }
            Ok(Value::Vector(out))
        }
        (Value::Scalar(a), Value::Vector(v)) => {
            let mut out = Vector::new();
            for (l, b) in v {
                if let Some(x) = combine(a, b, b)? {
                    out.push((drop_name(l), x));
                }
            }
            Ok(Value::Vector(out))
        }
        (Value::Vector(l), Value::Vector(r)) => match op {
            "and" | "unless" => {
                let keys: Vec<Labels> = r.iter().map(|(k, _)| match_key(k, matching)).collect();
                Ok(Value::Vector(
                    l.into_iter()
                        .filter(|(k, _)| keys.contains(&match_key(k, matching)) == (op == "and"))
                        .collect(),
                ))
            }
            "or" => {
                let keys: Vec<Labels> = l.iter().map(|(k, _)| match_key(k, matching)).collect();
                let mut out = l;
                out.extend(
                    r.into_iter()
                        .filter(|(k, _)| !keys.contains(&match_key(k, matching))),
                );
                Ok(Value::Vector(out))
            }
            _ => {
                let mut out = Vector::new();
                for (lk, a) in l {
                    let key = match_key(&lk, matching);
                    let mut partners = r.iter().filter(|(rk, _)| match_key(rk, matching) == key);
                    let Some((_, b)) = partners.next() else {
                        continue;
                    };
                    if partners.next().is_some() {
                        return Err(format!("many-to-one match on {key:?} (use group_left)"));
                    }
                    if let Some(x) = combine(a, *b, a)? {
                        let labels = match matching {
                            Some(LabelModifier::Include(_)) => key.clone(),
                            _ if is_comparison(op) && !return_bool => lk,
                            _ => drop_name(lk),
                        };
                        out.push((labels, x));
                    }
                }
                Ok(Value::Vector(out))
            }
        },
    }
}
