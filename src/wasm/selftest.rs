//! The SIMD128 kernels against the scalar reference on random and odd shapes, run inside the
//! wasm module (the npm test calls it under Node), since `cargo test` does not run on wasm32.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use wasm_bindgen::prelude::*;

use crate::cpu::kernels::Kernels;
use crate::cpu::packed::{padded_cols, PackedTernary};

/// Runs every kernel set of this build against the scalar one; returns JSON
/// `{"kernels": [...], "cases": n, "failures": [...]}` (empty failures = pass).
#[wasm_bindgen(js_name = kernelSelfTest)]
pub fn kernel_self_test() -> String {
    let mut failures: Vec<String> = Vec::new();
    let mut cases = 0usize;
    let sets = Kernels::available();
    let scalar = Kernels::scalar();
    let mut rng = StdRng::seed_from_u64(12345);
    // Ternary × int8 code dots: odd column counts (padding), several tokens, long rows (i16
    // flush boundaries), extreme activations.
    for (rows, cols, ntok) in [
        (4, 1, 1),
        (4, 127, 1),
        (4, 128, 1),
        (8, 130, 3),
        (12, 300, 9),
        (172, 64, 5),
        (8, 1025, 2),
        (8, 2304, 17),
        (20, 6912, 2),
        (16, 2560, 1),
    ] {
        let codes: Vec<Vec<u8>> = (0..rows)
            .map(|_| (0..cols).map(|_| rng.random_range(0..3u8)).collect())
            .collect();
        let w = PackedTernary::from_codes(&codes, cols, vec![1.0; rows]);
        let kpad = padded_cols(cols);
        let mut x = vec![0i8; ntok * kpad];
        for t in 0..ntok {
            for c in 0..cols {
                x[t * kpad + c] = if rng.random_bool(0.2) {
                    if rng.random_bool(0.5) {
                        127
                    } else {
                        -127
                    }
                } else {
                    rng.random_range(-127..=127)
                };
            }
        }
        let mut want = vec![0i32; rows * ntok];
        scalar.code_dots(w.data.as_slice(), w.row_bytes(), &x, ntok, &mut want);
        // Independent of the packed layout: straight from the codes.
        let direct: i32 = (0..cols).map(|c| codes[0][c] as i32 * x[c] as i32).sum();
        if want[0] != direct {
            failures.push(format!(
                "scalar code_dots row 0 {rows}x{cols}: {} != {direct}",
                want[0]
            ));
        }
        for k in &sets {
            cases += 1;
            let mut got = vec![0i32; rows * ntok];
            k.code_dots(w.data.as_slice(), w.row_bytes(), &x, ntok, &mut got);
            if got != want {
                failures.push(format!(
                    "{} code_dots rows={rows} cols={cols} ntok={ntok}",
                    k.name()
                ));
            }
        }
    }
    // Worst case for i16 accumulation: all +1 weights, all ±127 activations, many blocks.
    let cols = 128 * 40;
    let w = PackedTernary::from_codes(&vec![vec![2u8; cols]; 4], cols, vec![1.0; 4]);
    for sign in [127i8, -127] {
        let x = vec![sign; cols];
        for k in &sets {
            cases += 1;
            let mut got = [0i32; 4];
            k.code_dots(w.data.as_slice(), cols / 4, &x, 1, &mut got);
            if got != [2 * sign as i32 * cols as i32; 4] {
                failures.push(format!(
                    "{} code_dots overflow case sign {sign}: {got:?}",
                    k.name()
                ));
            }
        }
    }
    // int8 and bf16 dots (head kernels).
    for n in [1usize, 15, 16, 31, 64, 100, 2560, 2561] {
        let wi: Vec<i8> = (0..n).map(|_| rng.random_range(-127..=127)).collect();
        let xi: Vec<i8> = (0..n).map(|_| rng.random_range(-127..=127)).collect();
        let i_ref: i32 = wi.iter().zip(&xi).map(|(&a, &b)| a as i32 * b as i32).sum();
        let wb: Vec<u16> = (0..2 * n)
            .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_bits())
            .collect();
        let x: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let f_ref: Vec<f64> = wb
            .chunks(n)
            .map(|row| {
                row.iter()
                    .zip(&x)
                    .map(|(&b, &v)| half::bf16::from_bits(b).to_f64() * v as f64)
                    .sum()
            })
            .collect();
        for k in &sets {
            cases += 2;
            let got = k.dot_i8(&wi, &xi);
            if got != i_ref {
                failures.push(format!("{} dot_i8 n={n}: {got} != {i_ref}", k.name()));
            }
            let mut xp = vec![0.0; n];
            k.prepare_bf16_activations(&x, &mut xp);
            let mut two = [0.0f32; 2];
            k.head_bf16(&wb, n, &xp, &mut two);
            for (g, r) in two.iter().zip(&f_ref) {
                if (*g as f64 - r).abs() > 1e-4 * (1.0 + r.abs()) {
                    failures.push(format!("{} head_bf16 n={n}: {g} vs {r}", k.name()));
                }
            }
        }
    }
    json!({
        "kernels": sets.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "cases": cases,
        "failures": failures,
    })
    .to_string()
}
