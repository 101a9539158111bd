//! A run's flags in its checkpoint, and the check that a resume continues the same run:
//! `train` stores its parsed flags (as JSON) in every checkpoint's metadata under
//! [`RUN_FLAGS_KEY`]; `--resume` refuses flags that differ, naming each, except those
//! that cannot change the result ([`SAFE_TO_CHANGE`]) and `--epochs`, which may grow.

use serde_json::Value;

/// The checkpoint metadata key of the run's flags.
pub const RUN_FLAGS_KEY: &str = "run_flags";

/// Flags a resumed run may change: how it runs, where it writes and when it stops.
pub const SAFE_TO_CHANGE: &[&str] = &[
    "threads",
    "workers",
    "out",
    "resume",
    "overwrite",
    "stop_after",
    "max_steps",
];

fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

fn shown(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "unset".into(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    }
}

/// Every flag whose value differs between the checkpoint's run (`saved`) and this one
/// (`now`), as `--name (checkpoint: a, now: b)`; `--epochs` only when it shrinks.
pub fn differing_flags(saved: &Value, now: &Value) -> Vec<String> {
    let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) else {
        return vec!["the flags (not a JSON object)".into()];
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !SAFE_TO_CHANGE.contains(&k.as_str()))
        .filter_map(|k| {
            let (x, y) = (a.get(k), b.get(k));
            if k == "epochs" {
                let grows = matches!((x.and_then(Value::as_u64), y.and_then(Value::as_u64)), (Some(p), Some(q)) if q >= p);
                return (!grows).then(|| {
                    format!("--epochs may only grow (checkpoint: {}, now: {})", shown(x), shown(y))
                });
            }
            let same = x.unwrap_or(&Value::Null) == y.unwrap_or(&Value::Null);
            (!same).then(|| format!("{} (checkpoint: {}, now: {})", flag(k), shown(x), shown(y)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_each_changed_flag_and_allows_the_safe_ones() {
        let saved = json!({"lr": 0.1, "epochs": 10, "threads": 2, "arch": "resnet20", "label_smoothing": 0.0, "out": "a"});
        let now = json!({"lr": 0.05, "epochs": 12, "threads": 8, "arch": "resnet20", "label_smoothing": 0.1, "out": "b", "init_weights": "w.pth"});
        assert_eq!(
            differing_flags(&saved, &now),
            [
                "--init-weights (checkpoint: unset, now: w.pth)",
                "--label-smoothing (checkpoint: 0.0, now: 0.1)",
                "--lr (checkpoint: 0.1, now: 0.05)",
            ]
        );
        let fewer = json!({"lr": 0.1, "epochs": 5, "threads": 2, "arch": "resnet20", "label_smoothing": 0.0});
        assert_eq!(
            differing_flags(&saved, &fewer),
            ["--epochs may only grow (checkpoint: 10, now: 5)"]
        );
        assert!(differing_flags(&saved, &saved).is_empty());
    }
}
