//! Criterion micro-benchmarks of the CPU kernels at 2B4T shapes (single thread).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use bitnet_inference::cpu::kernels::Kernels;
use bitnet_inference::cpu::packed::PackedTernary;

fn packed(rows: usize, cols: usize) -> PackedTernary {
    let codes: Vec<Vec<u8>> = (0..rows)
        .map(|r| (0..cols).map(|c| ((r * 7 + c * 13) % 3) as u8).collect())
        .collect();
    PackedTernary::from_codes(&codes, cols, vec![1.0; rows])
}

fn ternary(c: &mut Criterion) {
    let mut g = c.benchmark_group("ternary_code_dots");
    g.sample_size(10);
    // gate|up of the default model (3584 × 640, in L2) and of 2B4T (13824 × 2560).
    for (w, ntoks) in [
        (packed(3584, 640), &[1usize, 4, 5, 8][..]),
        (packed(13824, 2560), &[1, 8, 64][..]),
    ] {
        for &ntok in ntoks {
            let x: Vec<i8> = (0..ntok * w.kpad).map(|i| ((i * 31) % 255) as i8).collect();
            let mut out = vec![0i32; w.rows * ntok];
            g.throughput(Throughput::Bytes(w.data.as_slice().len() as u64));
            for k in Kernels::available() {
                g.bench_with_input(
                    BenchmarkId::new(k.name(), format!("{}x{}/t{ntok}", w.rows, w.cols)),
                    &ntok,
                    |b, &n| {
                        b.iter(|| k.code_dots(w.data.as_slice(), w.row_bytes(), &x, n, &mut out))
                    },
                );
            }
        }
    }
    g.finish();
}

fn head(c: &mut Criterion) {
    let mut g = c.benchmark_group("head_dot");
    g.sample_size(10);
    let (rows, cols) = (8192, 2560);
    let wb: Vec<u16> = (0..rows * cols)
        .map(|i| half::bf16::from_f32((i % 17) as f32 * 0.01).to_bits())
        .collect();
    let wi: Vec<i8> = (0..rows * cols).map(|i| (i % 200) as i8).collect();
    let x: Vec<f32> = (0..cols).map(|i| i as f32 * 1e-3).collect();
    let xi: Vec<i8> = (0..cols).map(|i| (i % 100) as i8).collect();
    for k in Kernels::available() {
        g.throughput(Throughput::Bytes((rows * cols * 2) as u64));
        g.bench_function(BenchmarkId::new("bf16", k.name()), |b| {
            let mut xp = vec![0.0; cols];
            k.prepare_bf16_activations(&x, &mut xp);
            let mut out = vec![0.0; rows];
            b.iter(|| k.head_bf16(&wb, cols, &xp, &mut out))
        });
        g.throughput(Throughput::Bytes((rows * cols) as u64));
        g.bench_function(BenchmarkId::new("int8", k.name()), |b| {
            b.iter(|| {
                (0..rows)
                    .map(|r| k.dot_i8(&wi[r * cols..(r + 1) * cols], &xi))
                    .sum::<i32>()
            })
        });
    }
    g.finish();
}

/// The softmax's exponentials of one decode attention head at a 512-token context: the
/// engine's `exp_softmax` loop against libm's `expf`.
fn softmax(c: &mut Criterion) {
    use bitnet_inference::reference::softmax_exps;
    let mut g = c.benchmark_group("softmax_exps_512");
    let scores: Vec<f32> = (0..512).map(|i| -((i * 37 % 512) as f32) * 0.03).collect();
    let mut buf = scores.clone();
    g.bench_function("exp_softmax", |b| {
        b.iter(|| {
            buf.copy_from_slice(&scores);
            softmax_exps(&mut buf, 0.0)
        })
    });
    g.bench_function("libm_expf", |b| {
        b.iter(|| {
            buf.copy_from_slice(&scores);
            buf.iter_mut().fold(0.0, |a, s| {
                *s = s.exp();
                a + *s
            })
        })
    });
    g.finish();
}

criterion_group!(benches, ternary, head, softmax);
criterion_main!(benches);
