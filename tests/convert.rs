//! `bitnet convert`: the converted checkpoint holds the CPU kernels' layout (loaded without
//! repacking) and gives logits identical to its source, for a safetensors source of each
//! family and format (packed, master weights) and a GGUF source, on every backend.

use std::path::Path;

use bitnet_inference::engine::generate::{GenerateOptions, Generator};
use bitnet_inference::load::ModelFiles;

#[macro_use]
mod common;
use common::{cpu, prompts, TempDir};

#[test]
fn converted_checkpoints_map_the_kernel_layout_and_match_their_source() {
    let tmp = TempDir::new("convert");
    for (i, src) in [
        "tests/fixtures/tiny",
        "tests/fixtures/tiny-llama-bitnet",
        "tests/fixtures/tiny-llama-online",
        "tests/fixtures/tiny-1bitllm",
        "tests/fixtures/gguf/llama256-tq1-q8.gguf",
    ]
    .iter()
    .enumerate()
    {
        let out = tmp.join(&format!("m{i}"));
        bitnet_inference::convert::convert(Path::new(src), &out).unwrap();
        let a = ModelFiles::from_path(Path::new(src)).unwrap();
        let b = ModelFiles::from_path(&out).unwrap();
        assert!(a.weights.kernel_layout.is_none(), "{src}");
        assert!(b.weights.kernel_layout.is_some(), "{src}");
        assert_eq!(a.weights.config.family, b.weights.config.family);
        assert_eq!(a.generation, b.generation, "{src}");
        let (ta, tb) = (a.tokenizer.unwrap(), b.tokenizer.unwrap());
        let text = "Converted: the same tokens.";
        assert_eq!(
            ta.encode(text, true).unwrap(),
            tb.encode(text, true).unwrap()
        );
        let mut ga = Generator::new(cpu(&a.weights)).unwrap();
        let mut gb = Generator::new(cpu(&b.weights)).unwrap();
        let opts = GenerateOptions {
            max_tokens: 8,
            ignore_eos: true,
            ..Default::default()
        };
        for p in prompts(3, a.weights.config.vocab_size as u32, 5) {
            let want = ga.logits(&p, true).unwrap();
            assert_eq!(gb.logits(&p, true).unwrap(), want, "{src}");
            let tokens = ga.generate(&p, &opts, None, |_, _| true).unwrap().tokens;
            on_every_backend!(&b.weights, |name, _tol, be| {
                let got = Generator::new(be)
                    .unwrap()
                    .generate(&p, &opts, None, |_, _| true)
                    .unwrap()
                    .tokens;
                assert_eq!(got, tokens, "{src} {name}");
            });
        }
    }
}
