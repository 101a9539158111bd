//! LARS against timm's `Lars` (fixture: tests/fixtures/make_lars_fixture.py), float64:
//! five steps with known gradients, with and without trust clipping.

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use resblock_train::optim::{LarsConfig, Optimizer, ParamGroup, Sgd, SgdConfig};

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

#[test]
fn lars_matches_timm() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/lars.safetensors"
    );
    let f = candle_core::safetensors::load(path, &Device::Cpu)?;
    for (clip, tag) in [(false, "plain"), (true, "clip")] {
        let w = Var::from_tensor(&f["w0"])?;
        let b = Var::from_tensor(&f["b0"])?;
        let groups = vec![
            ParamGroup {
                params: vec![("w".into(), w.clone())],
                weight_decay: 1e-3,
            },
            ParamGroup {
                params: vec![("b".into(), b.clone())],
                weight_decay: 0.,
            },
        ];
        let mut opt = Sgd::lars(
            groups,
            SgdConfig {
                lr: 0.5,
                momentum: 0.9,
                dampening: 0.,
                nesterov: true,
            },
            LarsConfig {
                trust_coeff: 0.01,
                trust_clip: clip,
                ..Default::default()
            },
        )?;
        assert_eq!(opt.name(), "lars");
        for t in 0..5 {
            let loss = ((w.as_tensor() * &f[&format!("gw{t}")])?.sum_all()?
                + (b.as_tensor() * &f[&format!("gb{t}")])?.sum_all()?)?;
            opt.backward_step(&loss)?;
        }
        let dw = max_diff(w.as_tensor(), &f[&format!("w_{tag}")])?;
        let db = max_diff(b.as_tensor(), &f[&format!("b_{tag}")])?;
        assert!(dw < 1e-12 && db < 1e-12, "{tag}: weight {dw}, bias {db}");
    }
    assert!(Sgd::lars(
        Vec::new(),
        SgdConfig::default(),
        LarsConfig {
            trust_coeff: 0.,
            ..Default::default()
        }
    )
    .is_err());
    Ok(())
}
