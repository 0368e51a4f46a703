//! Unpacked "master" checkpoints (float linear weights, `quantization_mode: online`) are
//! ternarized at load with absmean, exactly as transformers' `WeightQuant` does.

use std::path::{Path, PathBuf};

use bitnet_inference::format::safetensors::load;
use bitnet_inference::quant::checkpoint_code;
use half::bf16;
use safetensors::tensor::{Dtype, TensorView};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bitnet-master-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Rewrites the fixture with every packed linear replaced by its bf16 real weight
/// `ternary × weight_scale` (no weight_scale tensors), and the config switched to online mode.
fn write_master(dst: &Path) {
    let src = Path::new("tests/fixtures/tiny");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        if name.ends_with(".weight_scale") {
            continue;
        }
        if view.dtype() == Dtype::U8 {
            let (r4, cols) = (view.shape()[0], view.shape()[1]);
            let rows = r4 * 4;
            let scale_name = name.replace(".weight", ".weight_scale");
            let s = st.tensor(&scale_name).unwrap();
            let ws = bf16::from_le_bytes([s.data()[0], s.data()[1]]).to_f32();
            let mut out = Vec::with_capacity(rows * cols * 2);
            for r in 0..rows {
                for c in 0..cols {
                    let w = checkpoint_code(view.data(), rows, cols, r, c) as f32 - 1.0;
                    out.extend_from_slice(&bf16::from_f32(w * ws).to_le_bytes());
                }
            }
            owned.push((name, Dtype::BF16, vec![rows, cols], out));
        } else {
            owned.push((
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
        }
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["quantization_config"]["quantization_mode"] = "online".into();
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
}

#[test]
fn master_weights_are_ternarized_with_absmean() {
    let dir = temp_dir("absmean");
    write_master(&dir);
    let packed = load(Path::new("tests/fixtures/tiny")).unwrap();
    let master = load(&dir).unwrap();
    assert!(master.config.online_quant);
    for (lp, lm) in packed.layers.iter().zip(&master.layers) {
        for (p, m) in lp.linears().into_iter().zip(lm.linears()) {
            let (mut cp, mut cm) = (vec![0u8; p.cols], vec![0u8; m.cols]);
            let mut nonzero = 0usize;
            for r in 0..p.rows {
                p.row_codes(r, &mut cp).unwrap();
                m.row_codes(r, &mut cm).unwrap();
                // |w·s| = 1/p_nonzero > 0.5, so absmean recovers the exact ternary codes.
                assert_eq!(cp, cm, "{} row {r}", p.name);
                nonzero += cp.iter().filter(|&&c| c != 1).count();
            }
            // The absmean scale is mean|W| = weight_scale × (fraction of non-zeros).
            let want = p.scale * nonzero as f32 / (p.rows * p.cols) as f32;
            assert!(
                (m.scale - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{}: {} vs {want}",
                p.name,
                m.scale
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
