//! An exponential moving average of a model's weights (timm's `ModelEmaV3`): after every
//! optimizer step, `ema = d * ema + (1 - d) * w` for every floating-point variable
//! (parameters and batch-norm running statistics); integer buffers
//! (`num_batches_tracked`) are copied.
//!
//! Without warmup (timm's default), every update uses `decay`. With warmup, the decay of
//! update `t` (1-based) is `min(decay, 1 - (1 + (t - 1)) ^ (-2/3))`: 0 at the first update
//! (the average starts as the weights), 0.37 at the second, 0.9 near the 32nd, 0.986 at
//! the 630th, 0.999 only near the 31,600th; so on short runs the warmup, not `decay`,
//! sets the average.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use candle_nn::VarMap;

use crate::error::{Error, Result};

/// Averaged weights by variable name.
#[derive(Debug, Clone)]
pub struct Ema {
    decay: f64,
    warmup: bool,
    updates: u64,
    shadow: BTreeMap<String, Tensor>,
}

impl Ema {
    /// An average of `varmap`'s variables, starting at their current values.
    ///
    /// # Errors
    /// A decay outside [0, 1).
    pub fn new(varmap: &VarMap, decay: f64, warmup: bool) -> Result<Self> {
        if !(0. ..1.).contains(&decay) {
            return Err(Error::config(format!(
                "the EMA decay must be in [0, 1), got {decay}"
            )));
        }
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let shadow = data
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            decay,
            warmup,
            updates: 0,
            shadow,
        })
    }

    /// The decay the next update uses.
    pub fn next_decay(&self) -> f64 {
        if !self.warmup {
            return self.decay;
        }
        let t = self.updates as f64; // (next update's 1-based number) - 1
        if t <= 0. {
            return 0.;
        }
        (1. - (1. + t).powf(-2. / 3.)).min(self.decay)
    }

    /// Moves the average toward `varmap`'s current values (call after each optimizer step).
    ///
    /// # Errors
    /// A variable that is not in the average or changed shape, naming it.
    pub fn update(&mut self, varmap: &VarMap) -> Result<()> {
        let d = self.next_decay();
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in data.iter() {
            let s = self
                .shadow
                .get_mut(k)
                .ok_or_else(|| Error::config(format!("EMA: variable {k} is not averaged")))?;
            let w = v.as_tensor().detach();
            if s.dims() != w.dims() {
                return Err(Error::config(format!(
                    "EMA: variable {k} has shape {:?}, the average {:?}",
                    w.dims(),
                    s.dims()
                )));
            }
            *s = if matches!(
                w.dtype(),
                DType::F16 | DType::BF16 | DType::F32 | DType::F64
            ) {
                ((&*s * d)? + (w * (1. - d))?)?
            } else {
                w.copy()?
            };
        }
        self.updates += 1;
        Ok(())
    }

    /// Updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The averaged tensors by variable name.
    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// Restores a saved average (`tensors` from [`Ema::tensors`], `updates` from
    /// [`Ema::updates`]), checking that it covers the same variables with the same shapes.
    ///
    /// # Errors
    /// A missing, extra or reshaped variable, naming it.
    pub fn restore(&mut self, tensors: &BTreeMap<String, Tensor>, updates: u64) -> Result<()> {
        for (k, s) in &self.shadow {
            let t = tensors
                .get(k)
                .ok_or_else(|| Error::config(format!("EMA: the saved average lacks {k}")))?;
            if t.dims() != s.dims() {
                return Err(Error::config(format!(
                    "EMA: the saved {k} has shape {:?}, the model {:?}",
                    t.dims(),
                    s.dims()
                )));
            }
        }
        if let Some(extra) = tensors.keys().find(|k| !self.shadow.contains_key(*k)) {
            return Err(Error::config(format!(
                "EMA: the saved average has {extra}, which is not in this model"
            )));
        }
        for (k, s) in self.shadow.iter_mut() {
            *s = tensors[k].to_dtype(s.dtype())?.to_device(s.device())?;
        }
        self.updates = updates;
        Ok(())
    }

    /// Swaps the averaged values with `varmap`'s (call twice to swap back): evaluating or
    /// saving the averaged model without a second copy of it.
    ///
    /// # Errors
    /// A variable whose value cannot be set.
    pub fn swap(&mut self, varmap: &VarMap) -> Result<()> {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in data.iter() {
            if let Some(s) = self.shadow.get_mut(k) {
                let current = v.as_tensor().detach().copy()?;
                v.set(s)?;
                *s = current;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn varmap(v: f32) -> Result<VarMap> {
        let vm = VarMap::new();
        vm.data().lock().expect("lock").insert(
            "w".into(),
            candle_core::Var::from_tensor(&Tensor::new(&[v, 2. * v], &Device::Cpu)?)?,
        );
        vm.data().lock().expect("lock").insert(
            "n".into(),
            candle_core::Var::from_tensor(&Tensor::new(&[3i64], &Device::Cpu)?)?,
        );
        Ok(vm)
    }

    fn set(vm: &VarMap, v: f32) -> Result<()> {
        let data = vm.data().lock().expect("lock");
        data["w"].set(&Tensor::new(&[v, 2. * v], &Device::Cpu)?)?;
        data["n"].set(&Tensor::new(&[v as i64], &Device::Cpu)?)?;
        Ok(())
    }

    fn w(e: &Ema) -> Vec<f32> {
        e.tensors()["w"].to_vec1::<f32>().expect("values")
    }

    #[test]
    fn averages_follow_the_formula_with_and_without_warmup() -> Result<()> {
        let vm = varmap(0.)?;
        // No warmup, decay 0.5: 0 -> (w = 4) 2 -> (w = 8) 5.
        let mut e = Ema::new(&vm, 0.5, false)?;
        set(&vm, 4.)?;
        e.update(&vm)?;
        assert_eq!(w(&e), [2., 4.]);
        set(&vm, 8.)?;
        e.update(&vm)?;
        assert_eq!(w(&e), [5., 10.]);
        // Integer buffers are copied.
        assert_eq!(e.tensors()["n"].to_vec1::<i64>()?, [8]);
        // Warmup: decays 0, 1 - 2^(-2/3) = 0.370, 1 - 3^(-2/3) = 0.519, capped at 0.5.
        let mut e = Ema::new(&varmap(0.)?, 0.5, true)?;
        let vm = varmap(0.)?;
        let mut want = 0f64;
        for (t, d) in [(1., 0.), (2., 1. - 2f64.powf(-2. / 3.)), (3., 0.5)] {
            assert!((e.next_decay() - d).abs() < 1e-12, "update {t}");
            set(&vm, t as f32)?;
            e.update(&vm)?;
            want = d * want + (1. - d) * t;
            assert!((f64::from(w(&e)[0]) - want).abs() < 1e-6);
        }
        assert!(Ema::new(&vm, 1., true).is_err());
        Ok(())
    }

    #[test]
    fn swap_exchanges_and_restore_checks() -> Result<()> {
        let vm = varmap(1.)?;
        let mut e = Ema::new(&vm, 0.9, false)?;
        set(&vm, 5.)?;
        e.swap(&vm)?;
        assert_eq!(
            vm.data().lock().expect("lock")["w"].to_vec1::<f32>()?,
            [1., 2.]
        );
        assert_eq!(w(&e), [5., 10.]);
        e.swap(&vm)?;
        assert_eq!(w(&e), [1., 2.]);
        let saved = e.tensors().clone();
        let mut other = Ema::new(&vm, 0.9, false)?;
        other.restore(&saved, 7)?;
        assert_eq!((w(&other), other.updates()), (vec![1., 2.], 7));
        let mut fewer = saved.clone();
        fewer.remove("w");
        let err = other.restore(&fewer, 1).expect_err("w is missing");
        assert!(err.to_string().contains("lacks w"), "{err}");
        Ok(())
    }
}
