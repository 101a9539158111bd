//! What a PyTorch `.pth` file may ask for. Its `data.pkl` is a pickle program: each GLOBAL
//! opcode names a Python function or class that `torch.load(weights_only=False)` would import
//! and call. A weight file needs only the few that rebuild tensors and dictionaries;
//! anything else (`posix.system`, `builtins.eval`, ...) is how a malicious file runs code.
//!
//! Our reader never executes a pickle (Candle's parser only builds a tree of objects). This
//! check reads that tree first and refuses a file that names any other global, naming it,
//! the way PyTorch's `weights_only=True` unpickler does.

use std::io::BufReader;
use std::path::Path;

use candle_core::pickle::{Object, Stack};

use crate::error::{Error, Result};

/// The globals a state dict's pickle may name (module, name): what `torch.save` writes for
/// tensors, parameters, storages and ordered dicts.
pub const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

fn refused(path: &Path, msg: String) -> Error {
    Error::WeightsFormat {
        path: path.display().to_string(),
        msg,
    }
}

/// The globals named anywhere in a parsed pickle, in the order met, without repeats.
pub fn globals_named(obj: &Object) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    // An explicit stack: a hostile file can nest deeper than the thread's stack.
    let mut todo = vec![obj];
    while let Some(o) = todo.pop() {
        match o {
            Object::Class {
                module_name,
                class_name,
            } => {
                let g = (module_name.clone(), class_name.clone());
                if !found.contains(&g) {
                    found.push(g);
                }
            }
            Object::Tuple(v) | Object::List(v) => todo.extend(v.iter().rev()),
            Object::Dict(kv) => {
                for (k, v) in kv.iter().rev() {
                    todo.push(v);
                    todo.push(k);
                }
            }
            Object::Reduce { callable, args } | Object::Build { callable, args } => {
                todo.push(args);
                todo.push(callable);
            }
            Object::PersistentLoad(o) => todo.push(o),
            Object::Int(_)
            | Object::Long(_)
            | Object::Float(_)
            | Object::Unicode(_)
            | Object::Bool(_)
            | Object::None
            | Object::Mark => {}
        }
    }
    found
}

/// Refuses a `.pth` whose pickle names a global outside [`ALLOWED_GLOBALS`], naming each
/// one (`posix.system`), or whose pickle cannot be parsed or claims more bytes than it has
/// ([`crate::pth_bounds::pickle_lengths`]). Nothing in the file runs.
///
/// # Errors
/// [`Error::WeightsFormat`] naming the file and what was refused; [`Error::Io`] when the
/// file cannot be opened.
pub fn check_pth_globals(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| refused(path, format!("not a PyTorch zip archive: {e}")))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with(".pkl"))
        .collect();
    for name in pickles {
        let mut entry = zip
            .by_name(&name)
            .map_err(|e| refused(path, format!("{name}: {e}")))?;
        let pkl = crate::pth_bounds::read_entry(path, &name, &mut entry, file_len)?;
        crate::pth_bounds::pickle_lengths(path, &name, &pkl)?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut BufReader::new(pkl.as_slice()))
            .map_err(|e| refused(path, format!("{name}: unsupported pickle: {e}")))?;
        let obj = stack
            .finalize()
            .map_err(|e| refused(path, format!("{name}: malformed pickle: {e}")))?;
        let bad: Vec<String> = globals_named(&obj)
            .into_iter()
            .filter(|(m, c)| !ALLOWED_GLOBALS.contains(&(m.as_str(), c.as_str())))
            .map(|(m, c)| format!("{m}.{c}"))
            .collect();
        if !bad.is_empty() {
            return Err(refused(
                path,
                format!(
                    "refused: {name} calls {} on load, which a weight file never needs (nothing was run; only tensors, parameters, storages and ordered dicts are accepted)",
                    bad.join(", ")
                ),
            ));
        }
    }
    Ok(())
}
