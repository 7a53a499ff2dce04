"""Shared fixtures: tiny random CogVideoX models built with the reference libraries (diffusers /
transformers) and saved in the official Hugging Face folder layout, so our loaders read exactly
what they would read from THUDM/CogVideoX-5b-I2V.

Every weight is perturbed away from its init (diffusers zero-initialises several layers), so a
component we forget to apply cannot hide behind a zero."""
import json
import random
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import model  # noqa: E402
import vae  # noqa: E402
torch.set_num_threads(2)

# Tiny sizes. Pixels 64x96 -> latents 8x12 (VAE /8) -> 4x6 patches; 9 frames -> 3 latent frames.
TINY_T5 = dict(vocab_size=160, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
               feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
               relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
TINY_DIT_I2V = asdict(model.presets["tiny"])  # our presets, as diffusers' keyword arguments
TINY_VAE = asdict(vae.presets["tiny"])
DDIM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", clip_sample=False, prediction_type="v_prediction",
                   rescale_betas_zero_snr=True, set_alpha_to_one=True, steps_offset=0,
                   timestep_spacing="trailing", snr_shift_scale=1.0)
_WORDS = ("the a cat dog runs jumps over lazy quick brown fox video zoom pan rotate blur fade "
          "camera light red green blue image effect slowly fast melt ripple shatter tiles").split()


@torch.no_grad()
def perturb(module, seed=0, std=0.05):
    """Add noise to every parameter and floating buffer so nothing is zero or exactly one."""
    g = torch.Generator().manual_seed(seed)
    for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
        t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * std)
    return module


def make_tokenizer_dir(path):
    """Train a ~60-piece sentencepiece model (no download possible) and lay it out like the
    official tokenizer/ folder. transformers' T5Tokenizer reads it and adds the 100 sentinels."""
    import sentencepiece as spm
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    corpus = path / "corpus.txt"
    lines = (" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(2000))
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(path / "spiece"),
                                   vocab_size=60, model_type="unigram", pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    corpus.unlink()
    (path / "spiece.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 226}))
    return path


def make_pipeline(tmp, seed=0):
    """A tiny CogVideoXImageToVideoPipeline (diffusers) with perturbed random weights."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler,
                           CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, T5Tokenizer
    torch.manual_seed(seed)
    tok = T5Tokenizer.from_pretrained(str(make_tokenizer_dir(Path(tmp) / "tok_src")))
    t5 = perturb(T5EncoderModel(T5Config(**TINY_T5)).eval(), seed + 1)
    dit = perturb(CogVideoXTransformer3DModel(**TINY_DIT_I2V).eval(), seed + 2)
    vae = perturb(AutoencoderKLCogVideoX(**TINY_VAE).eval(), seed + 3, std=0.02)
    sched = CogVideoXDDIMScheduler(**DDIM_CONFIG)
    return CogVideoXImageToVideoPipeline(tokenizer=tok, text_encoder=t5, vae=vae, transformer=dit,
                                         scheduler=sched)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_pipe_and_dir(tmp_path_factory):
    """(diffusers pipeline, folder) — the folder is the pipeline's `save_pretrained`, i.e. the
    official layout: transformer/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json."""
    tmp = tmp_path_factory.mktemp("tiny_i2v")
    pipe = make_pipeline(tmp)
    out = tmp / "model"
    pipe.save_pretrained(str(out), safe_serialization=True)
    # transformers 5 writes only tokenizer.json; the official folder ships spiece.model, which we
    # read first (test_tokenizer_json_only covers a folder with tokenizer.json alone).
    shutil.copy(tmp / "tok_src" / "spiece.model", out / "tokenizer" / "spiece.model")
    return pipe, out


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_pipe_and_dir):
    return tiny_pipe_and_dir[1]
