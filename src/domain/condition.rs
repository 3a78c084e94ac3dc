//! `when` conditions: CEL expressions over a step's data.
//!
//! A condition is a [CEL](https://github.com/google/cel-spec) expression that
//! must evaluate to a bool; `false` means the step is skipped. Two variables are
//! in scope:
//!
//! - `data`: the step's input data, the execution input merged with its
//!   ancestors' outputs (see [`crate::domain::data`]);
//! - `input`: the execution's input.
//!
//! JSON values become CEL values this way: an object becomes a map with string
//! keys (its fields are read as `data.source.table` or `data['source']`), an
//! array a list, a string a string, a bool a bool, `null` null. A number that
//! is an integer fitting in an `i64` becomes an `int`; any other number
//! (a fraction, an exponent, an integer beyond the `i64` range) becomes a
//! `double`. Comparisons between `int` and `double` work as expected
//! (`data.rows > 2`, `data.ratio > 0.5`, `data.count == 3.0`), but arithmetic
//! does not mix them: write `data.ratio * 2.0`, not `data.ratio * 2`.
//!
//! Reading a key that is not there is an error, not `false`: test presence
//! with `has(data.key)` (`has(data.key) && data.key > 2`), or with
//! `'key' in data`.
//!
//! The standard CEL functions and macros are available (`size`, `startsWith`,
//! `endsWith`, `contains`, `in`, `all`, `exists`, `exists_one`, `map`,
//! `filter`, conversions such as `int()` and `string()`); `matches` (regular
//! expressions) and timestamps/durations are not.
//!
//! Conditions come from users, so parsing and evaluating them never panics,
//! never overflows the stack, and never keeps the caller waiting long:
//!
//! - a condition is at most [`MAX_CONDITION_LEN`] bytes and nested at most
//!   [`MAX_NESTING`] levels deep (parentheses, lists, calls...);
//! - comprehensions (`all`, `exists`, `map`...) nest at most
//!   [`MAX_COMPREHENSION_NESTING`] deep, so their cost stays polynomial in the
//!   size of the data;
//! - parsing and evaluation run on a helper thread with a large stack (a long
//!   chain such as `1 + 1 + ... + 1` makes a deep syntax tree, too deep for a
//!   2 MiB stack in a debug build), and the caller waits at most
//!   [`EVAL_TIMEOUT`] for the answer. A condition still running then is
//!   reported as an error; its thread finishes on its own, and at most
//!   [`MAX_RUNNING`] such threads exist at a time.
//!
//! [`check`] and [`evaluate`] block the calling thread for as long as that
//! (normally well under a millisecond); from async code, call them through
//! `tokio::task::spawn_blocking` if a slow condition must not stall a worker.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, LazyLock};
use std::thread;
use std::time::Duration;

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, ParseErrors, Value};
use serde_json::Value as Json;

use crate::domain::data::JsonMap;

/// Longest condition accepted, in bytes.
pub const MAX_CONDITION_LEN: usize = 4096;

/// Deepest nesting of expressions (parentheses, list and map literals, call
/// arguments, `?:`) the parser accepts.
pub const MAX_NESTING: u16 = 32;

/// Deepest nesting of comprehensions (`all`, `exists`, `exists_one`, `map`,
/// `filter`) accepted: a comprehension may contain another one, no deeper.
pub const MAX_COMPREHENSION_NESTING: usize = 2;

/// Longest the caller waits for a condition to be parsed or evaluated.
pub const EVAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Most conditions being parsed or evaluated at a time, those that outlived
/// [`EVAL_TIMEOUT`] included; beyond it, [`check`] and [`evaluate`] fail.
pub const MAX_RUNNING: usize = 16;

/// Deepest JSON nesting of `data` and `input` converted to CEL values (JSON
/// parsed by `serde_json` is at most 128 deep).
const MAX_DATA_DEPTH: usize = 256;

/// Stack of the helper thread. The worst condition of [`MAX_CONDITION_LEN`]
/// bytes needs under 4 MiB in a debug build; the rest is margin. Only the
/// pages used are ever committed.
const STACK_SIZE: usize = 16 << 20;

/// Longest error message returned, in characters.
const MAX_MESSAGE_LEN: usize = 300;

/// The standard CEL environment: functions, macros and types.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// Helper threads currently running.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Checks that `source` is a syntactically valid condition (used when a
/// pipeline is created; the error text is shown to the user as a field
/// violation description, so make it precise and single-line).
pub fn check(source: &str) -> Result<(), String> {
    check_text(source)?;
    let source = source.to_owned();
    isolated(EVAL_TIMEOUT, move || parse(&source).map(drop))
}

/// Evaluates the condition. Variables: `data` (the step's input data: the execution
/// input merged with its ancestors' outputs) and `input` (the execution's input).
/// Ok(true/false) for a boolean result; Err with a clear message for a non-boolean
/// result, a missing key, a type error, or anything else that fails.
pub fn evaluate(source: &str, data: &JsonMap, input: &JsonMap) -> Result<bool, String> {
    evaluate_within(EVAL_TIMEOUT, source, data, input)
}

fn evaluate_within(
    timeout: Duration,
    source: &str,
    data: &JsonMap,
    input: &JsonMap,
) -> Result<bool, String> {
    check_text(source)?;
    let data = map_to_cel(data, 0).map_err(|e| format!("`data` {e}"))?;
    let input = map_to_cel(input, 0).map_err(|e| format!("`input` {e}"))?;
    let source = source.to_owned();
    isolated(timeout, move || {
        let expression = parse(&source)?;
        let mut context = Context::with_env(Arc::clone(&ENV));
        context.add_variable_from_value("data", data);
        context.add_variable_from_value("input", input);
        match Value::resolve(&expression, &context) {
            Ok(Value::Bool(result)) => Ok(result),
            Ok(other) => Err(single_line(&format!(
                "the condition must evaluate to a bool, but it evaluated to {}",
                describe_value(&other)
            ))),
            Err(error) => Err(describe_execution_error(&error)),
        }
    })
}

/// The checks that need no parsing: not blank, not too long.
fn check_text(source: &str) -> Result<(), String> {
    if source.trim().is_empty() {
        return Err("the condition is empty".to_owned());
    }
    if source.len() > MAX_CONDITION_LEN {
        return Err(format!(
            "the condition is {} bytes long, longer than the {MAX_CONDITION_LEN} allowed",
            source.len()
        ));
    }
    Ok(())
}

/// Parses `source`. Runs on a helper thread (see [`isolated`]).
fn parse(source: &str) -> Result<IdedExpr, String> {
    check_text(source)?;
    let parsed = catch_unwind(|| ENV.parser().max_recursion_depth(MAX_NESTING).parse(source))
        .map_err(|_| "the condition could not be parsed (the parser failed)".to_owned())?;
    let expression = parsed.map_err(|errors| describe_parse_errors(&errors))?;
    let nesting = comprehension_nesting(&expression);
    if nesting > MAX_COMPREHENSION_NESTING {
        return Err(format!(
            "comprehensions (all, exists, exists_one, map, filter) are nested {nesting} deep, \
             deeper than the {MAX_COMPREHENSION_NESTING} allowed"
        ));
    }
    Ok(expression)
}

/// How deep comprehensions nest in `expression`: only their loop bodies
/// multiply the work, their range and result are evaluated once.
fn comprehension_nesting(expression: &IdedExpr) -> usize {
    let entries = |entries: &[cel::common::ast::IdedEntryExpr]| {
        entries
            .iter()
            .map(|entry| match &entry.expr {
                EntryExpr::StructField(field) => comprehension_nesting(&field.value),
                EntryExpr::MapEntry(entry) => {
                    comprehension_nesting(&entry.key).max(comprehension_nesting(&entry.value))
                }
            })
            .max()
            .unwrap_or(0)
    };
    match &expression.expr {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => 0,
        Expr::Call(call) => call
            .target
            .iter()
            .map(|target| comprehension_nesting(target))
            .chain(call.args.iter().map(comprehension_nesting))
            .max()
            .unwrap_or(0),
        Expr::Comprehension(comprehension) => {
            let body = comprehension_nesting(&comprehension.loop_cond)
                .max(comprehension_nesting(&comprehension.loop_step));
            (body + 1)
                .max(comprehension_nesting(&comprehension.iter_range))
                .max(comprehension_nesting(&comprehension.accu_init))
                .max(comprehension_nesting(&comprehension.result))
        }
        Expr::List(list) => list
            .elements
            .iter()
            .map(comprehension_nesting)
            .max()
            .unwrap_or(0),
        Expr::Map(map) => entries(&map.entries),
        Expr::Select(select) => comprehension_nesting(&select.operand),
        Expr::Struct(structure) => entries(&structure.entries),
    }
}

/// Runs `job` on a helper thread with a [`STACK_SIZE`] stack, catching its
/// panics, and waits at most `timeout` for its result.
fn isolated<T: Send + 'static>(
    timeout: Duration,
    job: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let slot = Slot::take()
        .ok_or_else(|| format!("{MAX_RUNNING} conditions are still being evaluated, {BUSY}"))?;
    let (sender, receiver) = mpsc::sync_channel(1);
    thread::Builder::new()
        .name("condition".to_owned())
        .stack_size(STACK_SIZE)
        .spawn(move || {
            let _slot = slot;
            let result = catch_unwind(AssertUnwindSafe(job)).unwrap_or_else(|_| {
                Err("evaluating the condition failed unexpectedly (internal error)".to_owned())
            });
            // The caller may have stopped waiting.
            let _ = sender.send(result);
        })
        .map_err(|e| format!("could not start evaluating the condition: {e}"))?;
    match receiver.recv_timeout(timeout) {
        Ok(result) => result,
        Err(RecvTimeoutError::Timeout) => Err(format!(
            "the condition took longer than {} to evaluate",
            humantime::format_duration(timeout)
        )),
        Err(RecvTimeoutError::Disconnected) => {
            Err("evaluating the condition failed unexpectedly (internal error)".to_owned())
        }
    }
}

/// The end of the error [`check`] and [`evaluate`] give when [`MAX_RUNNING`]
/// conditions are being evaluated already.
const BUSY: &str = "too many to start another one; try again later";

/// Whether an error of [`check`] or [`evaluate`] only means "busy, try again".
pub fn is_busy(error: &str) -> bool {
    error.ends_with(BUSY)
}

/// One of the [`MAX_RUNNING`] helper threads, released when dropped.
struct Slot;

impl Slot {
    fn take() -> Option<Slot> {
        RUNNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < MAX_RUNNING).then_some(running + 1)
            })
            .ok()
            .map(|_| Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

fn map_to_cel(map: &JsonMap, depth: usize) -> Result<Value, String> {
    if depth > MAX_DATA_DEPTH {
        return Err(format!("is nested deeper than {MAX_DATA_DEPTH} levels"));
    }
    let entries = map
        .iter()
        .map(|(key, value)| Ok((Key::from(key.clone()), to_cel(value, depth + 1)?)))
        .collect::<Result<_, String>>()?;
    Ok(Value::Map(Map {
        map: Arc::new(entries),
    }))
}

fn to_cel(value: &Json, depth: usize) -> Result<Value, String> {
    Ok(match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Int(i),
            // Always Some without serde_json's `arbitrary_precision`.
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => {
            if depth > MAX_DATA_DEPTH {
                return Err(format!("is nested deeper than {MAX_DATA_DEPTH} levels"));
            }
            Value::List(Arc::new(
                items
                    .iter()
                    .map(|item| to_cel(item, depth + 1))
                    .collect::<Result<_, _>>()?,
            ))
        }
        Json::Object(map) => map_to_cel(map, depth)?,
    })
}

fn describe_parse_errors(errors: &ParseErrors) -> String {
    let mut described: Vec<String> = Vec::new();
    for error in &errors.errors {
        if error.msg.contains("Recursion limit") {
            return format!(
                "the condition is nested too deeply (at most {MAX_NESTING} levels of \
                 parentheses, lists, maps and calls)"
            );
        }
        let message = error
            .msg
            .strip_prefix("Syntax error: ")
            .unwrap_or(&error.msg);
        let (line, column) = error.pos;
        let text = if line > 0 && column > 0 {
            format!("syntax error at line {line}, column {column}: {message}")
        } else {
            format!("syntax error: {message}")
        };
        if !described.contains(&text) {
            described.push(text);
        }
    }
    if described.is_empty() {
        return "syntax error".to_owned();
    }
    let more = described.len().saturating_sub(3);
    described.truncate(3);
    let mut text = described.join("; ");
    if more > 0 {
        text.push_str(&format!(" (and {more} more)"));
    }
    single_line(&text)
}

fn describe_execution_error(error: &ExecutionError) -> String {
    let text = match error {
        ExecutionError::NoSuchKey(key) => format!(
            "no such key: '{key}' (use has() to test whether a key is present, \
             as in has(data.key))"
        ),
        ExecutionError::UndeclaredReference(name) => format!(
            "undeclared reference to '{name}' (the variables are `data` and `input`; \
             functions are the standard CEL ones)"
        ),
        other => other.to_string(),
    };
    single_line(&text)
}

/// A short description of a value for an error message: its CEL type, and
/// the value itself when it is short.
fn describe_value(value: &Value) -> String {
    const PREVIEW: usize = 40;
    match value {
        Value::Null => "null".to_owned(),
        Value::Int(i) => format!("an int {i}"),
        Value::UInt(u) => format!("a uint {u}u"),
        // CEL calls its floating-point type `double`.
        Value::Float(f) => format!("a double {f:?}"),
        Value::String(s) if s.chars().count() <= PREVIEW => format!("a string {:?}", s.as_str()),
        Value::String(s) => format!("a string of {} characters", s.chars().count()),
        Value::List(items) => format!("a list with {} elements", items.len()),
        Value::Map(map) => format!("a map with {} entries", map.map.len()),
        other => format!("a value of type {}", other.type_of()),
    }
}

/// `text` on one line (control characters become spaces), at most
/// [`MAX_MESSAGE_LEN`] characters.
fn single_line(text: &str) -> String {
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE_LEN)
        .collect();
    if text.chars().nth(MAX_MESSAGE_LEN).is_some() {
        line.push('…');
    }
    line.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Json) -> JsonMap {
        v.as_object().unwrap().clone()
    }

    fn data() -> JsonMap {
        obj(json!({
            "source": {"table": "orders", "schema": "public"},
            "rows": 3,
            "ratio": 0.75,
            "big": 18446744073709551615u64,
            "whole": 3.0,
            "tags": ["daily", "eu"],
            "name": "orders_2024",
            "enabled": true,
            "nothing": null,
            "items": [{"ok": true}, {"ok": false}],
        }))
    }

    fn input() -> JsonMap {
        obj(json!({"mode": "full", "limit": 10}))
    }

    fn eval(source: &str) -> Result<bool, String> {
        evaluate(source, &data(), &input())
    }

    #[track_caller]
    fn assert_true(source: &str) {
        assert_eq!(eval(source), Ok(true), "{source}");
    }

    #[track_caller]
    fn assert_false(source: &str) {
        assert_eq!(eval(source), Ok(false), "{source}");
    }

    #[track_caller]
    fn assert_err(source: &str, expected: &str) -> String {
        let error = eval(source).expect_err(source);
        assert!(
            error.contains(expected),
            "{source}: {error:?} should mention {expected:?}"
        );
        assert!(!error.contains('\n'), "{error:?} is not single-line");
        error
    }

    #[test]
    fn nested_fields_compare() {
        assert_true("data.source.table == 'orders'");
        assert_false("data.source.table == 'customers'");
        assert_true("data['source']['schema'] != 'private'");
        assert_true("input.mode == 'full'");
        assert_true("data.enabled");
        assert_true("data.nothing == null");
    }

    #[test]
    fn logical_operators() {
        assert_true("data.rows > 2 && data.source.table == 'orders'");
        assert_false("data.rows > 5 && data.source.table == 'orders'");
        assert_true("data.rows > 5 || input.mode == 'full'");
        assert_true("!(data.rows > 5)");
        assert_false("!data.enabled");
        assert_true("data.rows > 5 ? false : true");
    }

    #[test]
    fn in_with_lists_and_maps() {
        assert_true("'eu' in data.tags");
        assert_false("'us' in data.tags");
        assert_true("input.mode in ['full', 'incremental']");
        assert_true("'source' in data");
        assert_true("data.items.exists(i, !i.ok)");
        assert_false("data.items.all(i, i.ok)");
        assert_true("size(data.tags) == 2");
    }

    #[test]
    fn has_tests_presence() {
        assert_true("has(data.rows)");
        assert_true("has(data.source.table)");
        assert_false("has(data.missing)");
        assert_true("has(data.nothing)");
        assert_false("has(data.missing) && data.missing > 2");
        assert_true("!has(data.missing) || data.missing > 2");
    }

    #[test]
    fn string_functions() {
        assert_true("data.name.startsWith('orders_')");
        assert_true("data.name.endsWith('2024')");
        assert_true("data.name.contains('_20')");
        assert_true("size(data.name) == 11");
        assert_false("data.source.table.startsWith('cust')");
    }

    #[test]
    fn integers_and_doubles_compare() {
        // rows is the JSON integer 3, an int; ratio 0.75 a double.
        assert_true("data.rows > 2");
        assert_true("data.rows == 3");
        assert_true("data.rows > 2.5");
        assert_true("data.rows < 3.5");
        assert_true("data.ratio > 0.5");
        assert_true("data.ratio < 1");
        // 3.0 is a double, equal to the int 3.
        assert_true("data.whole == 3");
        // Beyond i64: a double.
        assert_true("data.big > 1.0e19");
        assert_true("data.rows + input.limit == 13");
        assert_true("data.ratio * 2.0 == 1.5");
    }

    #[test]
    fn arithmetic_does_not_mix_int_and_double() {
        assert_err("data.ratio * 2 > 1.0", "Unsupported binary operator 'mul'");
    }

    #[test]
    fn non_boolean_result_is_an_error() {
        assert_eq!(
            eval("data.rows + 1"),
            Err("the condition must evaluate to a bool, but it evaluated to an int 4".to_owned())
        );
        assert_err("data.source.table", "evaluated to a string \"orders\"");
        assert_err("data.ratio", "evaluated to a double 0.75");
        assert_err("data.tags", "evaluated to a list with 2 elements");
        assert_err("data.nothing", "evaluated to null");
        assert_err("b'abc'", "evaluated to a value of type bytes");
    }

    #[test]
    fn missing_key_is_an_error() {
        let error = assert_err("data.missing > 2", "no such key: 'missing'");
        assert!(error.contains("has("), "{error}");
        assert_err("data.source.column == 'id'", "no such key: 'column'");
        assert_err("dta.rows > 2", "undeclared reference to 'dta'");
    }

    #[test]
    fn type_errors_are_errors() {
        assert_err("data.name > 2", "no matching overload");
        assert_err("data.rows && true", "no matching overload");
        assert_err("data.rows / 0 == 1", "Division by zero");
        assert_err("nosuchfunction(data.rows)", "nosuchfunction");
        // A huge operand does not make a huge message.
        let big = obj(json!({"list": (0..10_000).collect::<Vec<_>>()}));
        let error = evaluate("data.list + 1 == 2", &big, &JsonMap::new()).unwrap_err();
        assert!(error.chars().count() <= MAX_MESSAGE_LEN + 1, "{error}");
    }

    #[test]
    fn check_accepts_valid_conditions() {
        assert_eq!(check("data.source.table == 'orders'"), Ok(()));
        assert_eq!(check("has(data.rows) && data.rows > 2"), Ok(()));
        // Names are only resolved when evaluating.
        assert_eq!(check("anything.at.all"), Ok(()));
    }

    #[test]
    fn check_reports_syntax_errors() {
        assert_eq!(
            check("data.rows >"),
            Err(
                "syntax error at line 1, column 12: mismatched input '<EOF>' expecting \
                 {'[', '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, \
                 NUM_UINT, STRING, BYTES, IDENTIFIER}"
                    .to_owned()
            )
        );
        let error = check("data.rows == 1 )\n && true").unwrap_err();
        assert!(
            error.starts_with("syntax error at line 1, column 16: "),
            "{error}"
        );
        assert!(!error.contains('\n'), "{error}");
        let error = check("'unterminated").unwrap_err();
        assert!(
            error.starts_with("syntax error at line 1, column 1: "),
            "{error}"
        );
        assert!(check("data.rows = 3").is_err());
        assert!(check("99999999999999999999 > 1").is_err());
        // Evaluating reports them too.
        assert!(eval("data.rows >").unwrap_err().starts_with("syntax error"));
    }

    #[test]
    fn check_rejects_blank_and_too_long() {
        assert_eq!(check(""), Err("the condition is empty".to_owned()));
        assert_eq!(check(" \t\n"), Err("the condition is empty".to_owned()));
        assert_eq!(eval(""), Err("the condition is empty".to_owned()));
        let long = format!("true{}", " ".repeat(MAX_CONDITION_LEN));
        assert_eq!(
            check(&long),
            Err(format!(
                "the condition is {} bytes long, longer than the 4096 allowed",
                MAX_CONDITION_LEN + 4
            ))
        );
        let longest = format!("true{}", " ".repeat(MAX_CONDITION_LEN - 4));
        assert_eq!(check(&longest), Ok(()));
    }

    #[test]
    fn hostile_inputs_are_errors() {
        let deep = format!("{}true{}", "(".repeat(500), ")".repeat(500));
        assert!(
            check(&deep).unwrap_err().contains("nested too deeply"),
            "{deep}"
        );
        let unbalanced = format!("{}true", "(".repeat(500));
        assert!(check(&unbalanced).is_err());
        assert!(check("((data.rows > 2)").is_err());
        assert!(check("data.rows > 2))").is_err());
        assert!(check(&"[".repeat(2000)).is_err());
        assert!(check(&format!("{}1{}", "size(".repeat(500), ")".repeat(500))).is_err());
        assert!(check("\0\u{feff}'\"\\").is_err());
        assert!(check("'\\u{zz}'").is_err());
        assert!(check("data.`rows` > 1").is_err());
        assert!(check(&"!".repeat(MAX_CONDITION_LEN + 1)).is_err());
        // Long chains build deep trees that a small stack could not hold.
        let sum = format!("1{} > 0", " +1".repeat((MAX_CONDITION_LEN - 5) / 3));
        assert_eq!(eval(&sum), Ok(true));
        let chain = format!("data{}", ".a".repeat((MAX_CONDITION_LEN - 4) / 2));
        assert_err(&chain, "no such key: 'a'");
        let comparisons = format!("1{}", "<1".repeat((MAX_CONDITION_LEN - 1) / 2));
        assert!(eval(&comparisons).is_err());
        let indexes = format!("data.tags{}", "[0]".repeat(1300));
        assert!(eval(&indexes).is_err());
        assert_eq!(eval(&format!("{}true", "!".repeat(4000))), Ok(true));
    }

    #[test]
    fn deeply_nested_comprehensions_are_rejected() {
        assert_eq!(
            check("data.items.exists(i, data.tags.exists(t, t == 'eu' && i.ok))"),
            Ok(())
        );
        // The range and result of a comprehension are evaluated once.
        assert_eq!(
            check("data.tags.map(t, t + '!').filter(t, t != 'eu!').exists(t, true)"),
            Ok(())
        );
        let list = format!(
            "[{}]",
            (0..10).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
        );
        let nested = format!(
            "{list}.exists(a, {list}.exists(b, {list}.exists(c, {list}.exists(d, a+b+c+d < 0))))"
        );
        assert_eq!(
            check(&nested),
            Err(
                "comprehensions (all, exists, exists_one, map, filter) are nested 4 deep, \
                 deeper than the 2 allowed"
                    .to_owned()
            )
        );
    }

    #[test]
    fn slow_conditions_time_out() {
        // A million iterations: about a second in a debug build.
        let data = obj(json!({"n": (0..1000).collect::<Vec<_>>()}));
        let source = "data.n.exists(a, data.n.exists(b, a + b < 0))";
        let error =
            evaluate_within(Duration::from_millis(10), source, &data, &JsonMap::new()).unwrap_err();
        assert_eq!(error, "the condition took longer than 10ms to evaluate");
    }

    #[test]
    fn deep_data_is_an_error() {
        let mut deep = json!(1);
        for _ in 0..300 {
            deep = json!([deep]);
        }
        let data = obj(json!({ "deep": deep }));
        let error = evaluate("true", &data, &JsonMap::new()).unwrap_err();
        assert_eq!(error, "`data` is nested deeper than 256 levels");
    }

    #[test]
    fn evaluations_run_concurrently() {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                thread::spawn(move || evaluate(&format!("data.rows > {i}"), &data(), &input()))
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results[0..3], [Ok(true), Ok(true), Ok(true)]);
        assert_eq!(
            results[3..],
            [Ok(false), Ok(false), Ok(false), Ok(false), Ok(false)]
        );
    }
}
