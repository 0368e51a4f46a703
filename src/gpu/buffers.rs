//! GPU memory: weight repacking, head/embedding sharding under the binding-size limit, and
//! buffer helpers. Everything here runs once at load time.

use super::ops::head::ShardP;
use rayon::prelude::*;
use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::format::{FloatDtype, FloatTensor};

/// Usage of activation and weight buffers (copies allow tests to read and write them).
pub const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Columns padded to a multiple of 64 (one vec4<u32> of 2-bit codes, 64 int8 activations).
pub fn pad64(n: usize) -> usize {
    n.div_ceil(64) * 64
}

/// Elements of a head/embedding row padded to a multiple of 8 (one vec4<u32> of bf16 pairs).
pub fn pad8(n: usize) -> usize {
    n.div_ceil(8) * 8
}

/// A zero-filled storage buffer of at least `bytes` bytes.
pub fn storage(device: &wgpu::Device, label: &str, bytes: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: (bytes.max(16) as u64).div_ceil(16) * 16,
        usage: STORAGE,
        mapped_at_creation: false,
    })
}

/// A storage buffer holding `data` (padded to 16 bytes), written through the queue in chunks:
/// in a browser this hands WebGPU a view of wasm memory (one copy), where a buffer mapped at
/// creation costs a copy into wasm memory and one back, at a few tens of MB/s on Dawn.
pub fn storage_upload(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    label: &str,
    data: &[u8],
) -> wgpu::Buffer {
    const CHUNK: usize = 64 << 20;
    let buf = storage(device, label, data.len());
    let aligned = data.len() / 4 * 4;
    for (i, c) in data[..aligned].chunks(CHUNK).enumerate() {
        queue.write_buffer(&buf, (i * CHUNK) as u64, c);
    }
    if aligned < data.len() {
        let mut tail = data[aligned..].to_vec();
        tail.resize(4, 0);
        queue.write_buffer(&buf, aligned as u64, &tail);
    }
    buf
}

/// A storage buffer holding `data` (padded to 16 bytes).
pub fn storage_init(device: &wgpu::Device, label: &str, data: &[u8]) -> wgpu::Buffer {
    if data.len().is_multiple_of(16) && !data.is_empty() {
        return device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: data,
            usage: STORAGE,
        });
    }
    let mut v = data.to_vec();
    v.resize(data.len().max(16).div_ceil(16) * 16, 0);
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: &v,
        usage: STORAGE,
    })
}

/// A uniform buffer holding `params` (a struct of [`super::params`]).
pub fn uniform<T: bytemuck::Pod>(device: &wgpu::Device, label: &str, params: &T) -> wgpu::Buffer {
    device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some(label),
        contents: bytemuck::bytes_of(params),
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    })
}

/// One slice of the vocabulary rows of the embedding/head, small enough for one binding.
#[derive(Clone)]
pub struct Shard {
    /// First vocabulary row.
    pub row0: usize,
    /// Rows held.
    pub rows: usize,
    /// The rows: bf16 pairs (or f32 bits, or int8), `row_words` u32 per row.
    pub buf: wgpu::Buffer,
    /// Its uniform (row0, rows, cols, row_words, vocab, hn vec4 per row, f16 scale).
    pub uni: wgpu::Buffer,
}

/// u32 words per stored row of `t` on the GPU.
pub fn head_row_words(t: &FloatTensor) -> usize {
    match t.dtype {
        FloatDtype::BF16 => pad8(t.cols) / 2,
        _ => pad8(t.cols),
    }
}

/// A shard's uniform (head_shard.wgsl): rows `row0..row0 + rows` of `t`, `row_words` u32 per
/// stored row, `input_vec4` vec4 per row of the head's input, its weights' f16 `scale`.
fn shard_uniform(
    device: &wgpu::Device,
    t: &FloatTensor,
    (row0, rows): (usize, usize),
    row_words: usize,
    input_vec4: usize,
    scale: f32,
) -> wgpu::Buffer {
    let p = ShardP {
        row0: row0 as u32,
        rows: rows as u32,
        cols: t.cols as u32,
        row_words: row_words as u32,
        vocab: t.rows as u32,
        hn_vec4: input_vec4 as u32,
        scale,
        unscale: 1.0 / scale,
    };
    uniform(device, "shard", &p)
}

/// The power of two that scales the largest magnitude among the bf16 values `bytes` (little
/// endian) below 2^15, so that each of them is an f16 (exactly, down to 30 binades below the
/// largest); 1 where all are zero or one is not finite.
pub fn bf16_f16_scale(bytes: &[u8]) -> f32 {
    let most = bytes
        .par_chunks(1 << 16)
        .map(|c| {
            c.chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7fff)
                .max()
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0);
    let exponent = i32::from(most >> 7);
    if most == 0 || exponent == 0xff {
        return 1.0;
    }
    // The largest is below 2^(exponent - 126).
    2f32.powi((141 - exponent).clamp(-100, 100))
}

/// Uploads `t` (`[vocab, hidden]`) as shards of at most `max_bytes` each; with `f16_scale`
/// each bf16 shard's uniform gets the scale of [`bf16_f16_scale`] (else 1).
pub fn upload_shards(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    t: &FloatTensor,
    max_bytes: u64,
    f16_scale: bool,
) -> Result<Vec<Shard>> {
    let rw = head_row_words(t);
    let row_bytes = rw * 4;
    let per = (max_bytes as usize / row_bytes).min(t.rows);
    if per == 0 {
        return Err(Error::Backend(format!(
            "{}: one row ({row_bytes} bytes) exceeds the binding limit of {max_bytes} bytes",
            t.name
        )));
    }
    let es = t.dtype.size();
    let src = t.bytes.as_slice();
    let mut shards = Vec::new();
    let mut row0 = 0;
    // bf16 rows without padding are already the words the kernels read (pairs, low half first).
    let as_stored = t.dtype == FloatDtype::BF16 && rw * 2 == t.cols;
    while row0 < t.rows {
        let rows = per.min(t.rows - row0);
        let stored = &src[row0 * t.cols * es..(row0 + rows) * t.cols * es];
        let packed: Vec<u32>;
        let words: &[u8] = if as_stored {
            stored
        } else {
            let mut words = vec![0u32; rows * rw];
            words.par_chunks_mut(rw).enumerate().for_each_init(
                || vec![0f32; t.cols],
                |tmp, (i, out)| {
                    let r = row0 + i;
                    match t.dtype {
                        FloatDtype::BF16 => {
                            let raw = &src[r * t.cols * es..(r + 1) * t.cols * es];
                            for (c, b) in raw.chunks_exact(2).enumerate() {
                                out[c / 2] |=
                                    (u16::from_le_bytes([b[0], b[1]]) as u32) << (16 * (c % 2));
                            }
                        }
                        _ => {
                            t.row_into(r, tmp);
                            for (o, v) in out.iter_mut().zip(tmp.iter()) {
                                *o = v.to_bits();
                            }
                        }
                    }
                },
            );
            packed = words;
            bytemuck::cast_slice(&packed)
        };
        let buf = storage_upload(device, queue, &format!("{} rows {row0}..", t.name), words);
        let scale = if f16_scale && t.dtype == FloatDtype::BF16 {
            bf16_f16_scale(stored)
        } else {
            1.0
        };
        let uni = shard_uniform(device, t, (row0, rows), rw, pad8(t.cols) / 4, scale);
        t.bytes
            .release_range(row0 * t.cols * es, rows * t.cols * es);
        shards.push(Shard {
            row0,
            rows,
            buf,
            uni,
        });
        row0 += rows;
    }
    Ok(shards)
}

/// Quantizes `t` (`[vocab, hidden]`) to int8 rows with per-row scales (as the CPU backend's
/// int8 head) and uploads them as shards of at most `max_bytes`: each shard's rows (padded to
/// 64 int8) and, beside it, its row scales.
pub fn upload_i8_shards(
    device: &wgpu::Device,
    queue: &wgpu::Queue,
    t: &FloatTensor,
    max_bytes: u64,
) -> Result<Vec<(Shard, wgpu::Buffer)>> {
    let row_bytes = pad64(t.cols);
    let rw = row_bytes / 4;
    let per = (max_bytes as usize / row_bytes).min(t.rows);
    if per == 0 {
        return Err(Error::Backend(format!(
            "{}: one int8 row ({row_bytes} bytes) exceeds the binding limit of {max_bytes} bytes",
            t.name
        )));
    }
    let mut shards = Vec::new();
    let mut row0 = 0;
    while row0 < t.rows {
        let rows = per.min(t.rows - row0);
        let mut q = vec![0i8; rows * row_bytes];
        let mut scale = vec![0f32; rows];
        q.par_chunks_mut(row_bytes)
            .zip(scale.par_iter_mut())
            .enumerate()
            .for_each_init(
                || vec![0f32; t.cols],
                |tmp, (i, (qr, s))| {
                    t.row_into(row0 + i, tmp);
                    *s = crate::quant::quantize_row_absmax(tmp, &mut qr[..t.cols]);
                },
            );
        let name = format!("{} int8 rows {row0}..", t.name);
        let buf = storage_upload(device, queue, &name, bytemuck::cast_slice(&q));
        let scales = storage_init(device, &name, bytemuck::cast_slice(&scale));
        let uni = shard_uniform(device, t, (row0, rows), rw, pad64(t.cols) / 16, 1.0);
        shards.push((
            Shard {
                row0,
                rows,
                buf,
                uni,
            },
            scales,
        ));
        row0 += rows;
    }
    Ok(shards)
}

/// A whole-buffer binding entry.
pub fn entry(binding: u32, buf: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: buf.as_entire_binding(),
    }
}

/// A bind group over whole buffers, bound in order 0, 1, 2, ...
pub fn bind_group(
    device: &wgpu::Device,
    label: &str,
    layout: &wgpu::BindGroupLayout,
    bufs: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<_> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| entry(i as u32, b))
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout,
        entries: &entries,
    })
}

#[cfg(test)]
mod tests {
    use super::bf16_f16_scale;
    use half::{bf16, f16};

    fn bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect()
    }

    /// The scale puts the largest magnitude in [2^14, 2^15) and every value, scaled, is an
    /// f16; all zeros or a value that is not finite leave the scale at 1.
    #[test]
    fn bf16_scale_makes_every_value_an_f16() {
        for values in [
            vec![0.5, -3.0, 1e-3, 2e-7, 0.0],
            vec![65280.0, -1.0, 0.25],
            vec![-1e-20, 3e-22],
            vec![1e30, -7.5e29],
        ] {
            let s = bf16_f16_scale(&bytes(&values));
            let most = values
                .iter()
                .fold(0f32, |m, v| m.max(bf16::from_f32(*v).to_f32().abs()));
            assert!(
                (16384.0..32768.0).contains(&(most * s)),
                "{values:?}: scale {s}"
            );
            for v in &values {
                let x = bf16::from_f32(*v).to_f32() * s;
                assert_eq!(f16::from_f32(x).to_f32(), x, "{v} scaled by {s}");
            }
        }
        assert_eq!(bf16_f16_scale(&bytes(&[0.0, -0.0])), 1.0);
        assert_eq!(bf16_f16_scale(&bytes(&[1.0, f32::INFINITY])), 1.0);
    }
}
