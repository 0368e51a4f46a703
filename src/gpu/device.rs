//! Timing, teardown and the device capabilities ([`crate::backend::DeviceSteps`]): token
//! selection on the device and queued greedy steps.

use super::*;

/// Where a step's wall time goes on the host: recording, submitting, waiting for the GPU.
#[derive(Default)]
pub(super) struct HostTiming {
    pub(super) started: Option<crate::time::Instant>,
    pub(super) steps: u64,
    pub(super) record: f64,
    pub(super) submit: f64,
    pub(super) wait: f64,
}

/// The little-endian u32 at the start of a readback (an argmax result).
pub(super) fn first_word(data: &[u8]) -> u32 {
    u32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

impl Drop for GpuBackend {
    fn drop(&mut self) {
        // BITNET_GPU_PROFILE=1: every kernel is timed from load on; the totals print at exit.
        if std::env::var_os("BITNET_GPU_PROFILE").is_some() {
            self.print_gpu_profile();
        }
        if let Some(t) = &self.timing {
            let n = t.steps.max(1) as f64 * 1e-6;
            eprintln!(
                "host timing over {} greedy steps: record {:.1} us, submit {:.1} us, wait {:.1} us per step",
                t.steps,
                t.record / n,
                t.submit / n,
                t.wait / n
            );
        }
    }
}

/// The device's own token selection, queued steps and kernel timing (offered on native
/// builds only: the browser reads results asynchronously, see `web.rs`).
impl crate::backend::DeviceSteps for GpuBackend {
    fn argmax_last(&mut self) -> Result<u32> {
        let rb = self.record_argmax_last();
        let t0 = crate::time::Instant::now();
        self.flush();
        let t1 = crate::time::Instant::now();
        let token = self.read_mapped(&rb, 4, first_word)?;
        if let Some(t) = &mut self.timing {
            if let Some(s) = t.started.take() {
                t.steps += 1;
                t.record += (t0 - s).as_secs_f64();
                t.submit += (t1 - t0).as_secs_f64();
                t.wait += t1.elapsed().as_secs_f64();
            }
        }
        Ok(token)
    }

    fn top_k_last(&mut self, k: usize, inv_t: f32, out: &mut Vec<(f32, u32)>) -> Result<bool> {
        let k = k.min(self.cfg.vocab_size);
        if k == 0 || k > ops::topk::MAX_K {
            return Ok(false);
        }
        self.record_head_last();
        self.top_k_of_logits(k, inv_t, out)?;
        Ok(true)
    }

    fn head_step_rows(
        &mut self,
        need: &[crate::backend::RowNeed],
        out: &mut crate::backend::HeadRows,
    ) -> Result<()> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let rows: Vec<usize> = (0..need.len()).collect();
            crate::backend::BatchBackend::head_rows(self, &rows, need, out)
        }
        // The browser reads results asynchronously (`web.rs`); its speculative steps read
        // the logits instead.
        #[cfg(target_arch = "wasm32")]
        {
            let _ = (need, out);
            Err(Error::Backend(
                "selecting step rows on the device needs blocking reads (native only)".into(),
            ))
        }
    }

    fn set_profiling(&mut self, on: bool) {
        self.rec.set_profiling(on, &self.ctx.queue);
    }

    fn take_profile(&mut self) -> Option<Vec<(&'static str, f64, u64)>> {
        self.rec.take_profile()
    }

    fn embed_decode_step(&mut self, first: Option<u32>, drafts: &[u32]) -> Result<()> {
        let t = 1 + drafts.len();
        if t > ops::attention::VEC_MAX_T {
            return Err(Error::Request(format!(
                "{t} tokens in one decode step; at most {}",
                ops::attention::VEC_MAX_T
            )));
        }
        match first {
            Some(tok) => {
                let mut tokens = Vec::with_capacity(t);
                tokens.push(tok);
                tokens.extend_from_slice(drafts);
                crate::backend::Backend::embed(self, &tokens)?;
            }
            None => {
                if self.queued.is_empty() {
                    return Err(Error::Request(
                        "no queued decode step to take the input token from".into(),
                    ));
                }
                if self.queued.len() >= self.bufs.argmax_ring.len() {
                    return Err(Error::Request(format!(
                        "at most {} decode steps may be queued",
                        self.bufs.argmax_ring.len()
                    )));
                }
                self.check_inputs(drafts, t)?;
                // Input 0 is in the tokens buffer already: the last queued step put it there.
                self.begin_step(drafts, t);
                // Behind a step with drafts the position moves back by those it rejects: the
                // step is submitted whole (the host's later writes of the step values would
                // undo the move), which holds with steps queued ahead of it.
                self.moves = self.ahead_drafts;
                if self.moves > 0 {
                    self.ops.accept.record_fixup(&mut self.rec, &self.accept_bg);
                }
            }
        }
        self.decode_rows = true;
        Ok(())
    }

    fn queue_argmax_rows(&mut self) -> Result<()> {
        self.record_argmax_rows()?;
        let rows = self.t();
        let rb = self.bufs.argmax_ring[self.queued_total % self.bufs.argmax_ring.len()].clone();
        self.queued_total += 1;
        // The next queued step's input: the pick after the accepted drafts.
        if rows > 1 {
            self.ops
                .accept
                .record_accept(&mut self.rec, &self.accept_bg);
        }
        self.ahead_drafts = rows - 1;
        let enc = self.rec.encoder();
        let res = &self.bufs.argmax_result;
        enc.copy_buffer_to_buffer(res, 0, &rb, 0, rows as u64 * 4);
        if rows == 1 {
            enc.copy_buffer_to_buffer(res, 0, &self.bufs.tokens, 0, 4);
        }
        let t0 = crate::time::Instant::now();
        let submission = self.flush();
        if let Some(t) = &mut self.timing {
            if let Some(s) = t.started.take() {
                t.record += (t0 - s).as_secs_f64();
                t.submit += t0.elapsed().as_secs_f64();
            }
        }
        self.queued.push_back(QueuedStep {
            readback: rb,
            submission,
            rows,
        });
        Ok(())
    }

    fn read_queued_argmax(&mut self, out: &mut Vec<u32>) -> Result<()> {
        let q = self
            .queued
            .pop_front()
            .ok_or_else(|| Error::Request("no queued decode step to read".into()))?;
        let t0 = crate::time::Instant::now();
        out.clear();
        self.read_mapped_after(&q.readback, q.rows as u64 * 4, q.submission, |data| {
            out.extend_from_slice(bytemuck::cast_slice::<u8, u32>(data))
        })?;
        if let Some(t) = &mut self.timing {
            t.steps += 1;
            t.wait += t0.elapsed().as_secs_f64();
        }
        Ok(())
    }
}
