"""data.py: PyAV reading by timestamps, writing, dataset layouts, reference pairing, bad-clip
handling and the latent/text cache. Videos are tiny synthetic mp4s whose brightness encodes the
frame index. Run: pytest -q tests/test_data.py"""
import json
import logging
import os

import av
import pytest
import torch

import cache as cache_lib
import data

H, W = 64, 96


def ramp(n, h=H, w=W, step=3, offset=10):
    """Frame i has brightness (offset + step*i)/255 and a dark left eighth, so resizing shows."""
    v = torch.stack([torch.full((3, h, w), (offset + step * i) / 255) for i in range(n)])
    v[..., : w // 8] *= 0.5
    return v


def frame_ids(video, table):
    """Map each read frame to the source frame whose mean brightness is nearest."""
    m = video.mean((1, 2, 3))
    return (m[:, None] - table[None]).abs().argmin(1).tolist()


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for cat, names in {"zoom": ["a1", "a2", "a3"], "pan": ["b1", "b2"], "melt": ["c1"]}.items():
        (root / cat).mkdir()
        for k, n in enumerate(names):
            data.write_video(root / cat / f"{n}.mp4", ramp(20, offset=10 + 7 * k), fps=8)
            (root / cat / f"{n}.txt").write_text(f"a {cat} video {n}\n")
    data.write_video(root / "pan" / "short.mp4", ramp(3), fps=8)
    (root / "zoom" / "corrupt.mp4").write_bytes(os.urandom(4000))
    return root


def test_write_video_roundtrip(tmp_path):
    p = data.write_video(tmp_path / "x.mp4", ramp(20), fps=8)
    assert sorted(os.listdir(tmp_path)) == ["x.mp4"]  # no temporary file left behind
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        got = (s.codec_context.name, s.average_rate, frames[0].format.name)
        assert got == ("h264", 8, "yuv420p")
    assert (len(frames), frames[0].height, frames[0].width) == (20, H, W)
    v = data.read_video(p, frames=20, fps=8, height=H, width=W)
    assert v.shape == (20, 3, H, W) and v.min() >= -1 and v.max() <= 1
    assert ((v + 1) / 2 - ramp(20)).abs().mean() < 0.02
    # odd sizes are padded to even ones (yuv420p)
    with av.open(str(data.write_video(tmp_path / "odd.mp4", ramp(2, 63, 95)))) as c:
        f = next(c.decode(video=0))
    assert (f.height, f.width) == (64, 96)


def read(p, frames, fps, **kw):
    return data.read_video(p, frames=frames, fps=fps, height=H, width=W, **kw)


def test_timestamp_sampling(tmp_path):
    p = data.write_video(tmp_path / "a24.mp4", ramp(72), fps=24)  # 3 s at 24 fps
    table = read(p, 72, 24).mean((1, 2, 3))
    assert table.diff().min() > 0  # every source frame is distinct and decoded in order
    assert frame_ids(read(p, 24, 8), table) == list(range(0, 72, 3))
    p8 = data.write_video(tmp_path / "a8.mp4", ramp(20), fps=8)
    table = read(p8, 20, 8).mean((1, 2, 3))
    assert frame_ids(read(p8, 10, 4), table) == list(range(0, 20, 2))
    # upsampling in time holds each source frame: 16 fps from 8 fps repeats each frame twice
    assert frame_ids(read(p8, 40, 16), table) == [i // 2 for i in range(40)]
    # 20 frames at 24 fps = 0.833 s -> at 8 fps, frames at 0, 1/8, ..., 6/8 s
    p = data.write_video(tmp_path / "b24.mp4", ramp(20), fps=24)
    table = read(p, 20, 24).mean((1, 2, 3))
    assert frame_ids(read(p, 7, 8), table) == [0, 3, 6, 9, 12, 15, 18]


def test_start_offset(tmp_path):
    """read_video(start=s) reads from s seconds on (sample.py --ref-start); past the end: error."""
    p = data.write_video(tmp_path / "a8.mp4", ramp(24), fps=8)
    table = read(p, 24, 8).mean((1, 2, 3))
    assert frame_ids(read(p, 9, 8, start=1.0), table) == list(range(8, 17))
    assert frame_ids(read(p, 4, 4, start=0.5), table) == [4, 6, 8, 10]
    assert data.duration(p) == pytest.approx(3.0)
    with pytest.raises(data.VideoError, match="starts past its end: 5 s into a 3.00 s video"):
        data.read_video(p, frames=9, fps=8, height=H, width=W, start=5)


def test_resize_cover_crop(tmp_path):
    p = data.write_video(tmp_path / "x.mp4", ramp(9), fps=8)
    v = data.read_video(p, frames=9, fps=8, height=32, width=32)  # 64x96 -> 32x48 -> centre 32x32
    assert v.shape == (9, 3, 32, 32)
    assert (v[:, :, :, 0] - v[:, :, :, -1]).abs().max() < 0.05  # the dark quarter was cropped away
    v = data.read_video(p, frames=9, fps=8, height=128, width=128)  # upscale to cover 128x192, crop
    assert v.shape == (9, 3, 128, 128)
    img = tmp_path / "x.png"
    with av.open(str(img), "w") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = W, H, "rgb24"
        arr = (ramp(1)[0] * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        c.mux(s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")))
        c.mux(s.encode(None))
    x = data.read_image(img, H, W)
    assert x.shape == (3, H, W) and ((x + 1) / 2 - ramp(1)[0]).abs().max() < 1e-5
    assert data.read_image(img, 32, 32).shape == (3, 32, 32)


def test_bad_videos(clips_dir, tmp_path):
    with pytest.raises(data.VideoError,
                       match=r"short\.mp4: too short: .* 3 frames at 8 fps, needs 9"):
        data.read_video(clips_dir / "pan" / "short.mp4", frames=9, fps=8, height=H, width=W)
    v, n = data.read_video(clips_dir / "pan" / "short.mp4", frames=9, fps=8, height=H, width=W,
                           allow_short=True)
    assert v.shape[0] == 9 and n == 3 and torch.equal(v[2], v[8])
    with pytest.raises(data.VideoError, match=r"corrupt\.mp4: cannot open"):
        data.read_video(clips_dir / "zoom" / "corrupt.mp4")
    with pytest.raises(data.VideoError, match=r"nope\.mp4: cannot open as a video .*No such file"):
        data.read_video(tmp_path / "nope.mp4")
    truncated = (clips_dir / "zoom" / "a1.mp4").read_bytes()[:1500]
    (tmp_path / "t.mp4").write_bytes(truncated)
    with pytest.raises(data.VideoError, match=r"t\.mp4"):
        data.read_video(tmp_path / "t.mp4", frames=9, fps=8, height=H, width=W)


def test_layouts(clips_dir):
    clips = data.scan(clips_dir)
    assert len(clips) == 8 and {c.category for c in clips} == {"zoom", "pan", "melt"}
    a1 = next(c for c in clips if c.path.endswith("a1.mp4"))
    assert a1.caption == "a zoom video a1" and a1.category == "zoom"
    rows = [{"video": os.path.relpath(c.path, clips_dir), "caption": c.caption,
             "category": c.category} for c in clips]
    (clips_dir / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (clips_dir / "m.csv").write_text("video,caption,category\n" + "".join(
        f'{r["video"]},"{r["caption"]}",{r["category"]}\n' for r in rows))
    assert data.scan(clips_dir / "m.jsonl") == clips
    assert data.scan(clips_dir / "m.csv") == clips
    (clips_dir / "m2.jsonl").write_text('{"video": "x.mp4"}\n')
    with pytest.raises(ValueError, match="row 1 needs 'video' and 'category'"):
        data.scan(clips_dir / "m2.jsonl")
    with pytest.raises(FileNotFoundError):
        data.scan(clips_dir / "missing")


def test_pairing(clips_dir, caplog):
    clips = data.scan(clips_dir)
    with caplog.at_level(logging.WARNING, logger="data"):
        ds = data.VideoPairs(clips, frames=9, fps=8, height=H, width=W, seed=3)
    assert [r.message for r in caplog.records] == [
        "warning: 1 categories have one clip, its own reference: melt"]
    refs = {e: [data.pair(clips, i, 3, e, ds.groups) for i in range(len(clips))] for e in range(4)}
    assert refs[0] == [data.pair(clips, i, 3, 0, ds.groups) for i in range(len(clips))]  # pure
    assert len({tuple(r) for r in refs.values()}) > 1  # changes with the epoch
    for r in refs.values():
        for i, j in enumerate(r):
            assert clips[j].category == clips[i].category
            assert (j == i) == (clips[i].category == "melt")


def test_dataset_skips_bad(clips_dir, tmp_path, caplog):
    clips = data.scan(clips_dir)
    ds = data.VideoPairs(clips, frames=9, fps=8, height=H, width=W, seed=0, run_dir=tmp_path)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate)
    with caplog.at_level(logging.WARNING, logger="data"):
        for epoch in range(2):
            ds.set_epoch(epoch)
            batches = [b for b in loader if b is not None]
    b = batches[0]
    assert b["video"].shape[1:] == (9, 3, H, W) and b["ref"].shape == b["video"].shape
    assert len(b["caption"]) == len(b["index"]) == b["video"].shape[0]
    bad = ds.bad_clips()
    assert sorted(os.path.basename(p) for p in bad) == ["corrupt.mp4", "short.mp4"]
    assert "too short" in bad[str(clips_dir / "pan" / "short.mp4")]
    lines = (tmp_path / "bad_clips.txt").read_text().splitlines()
    assert len(lines) == 2 and len([r for r in caplog.records if "skipping" in r.message]) == 2
    good = {i for b in batches for i in b["index"].tolist()}
    assert good <= {i for i, c in enumerate(clips)
                    if os.path.basename(c.path) not in ("corrupt.mp4", "short.mp4")}


def _mtimes(folder):
    return {f.name: f.stat().st_mtime_ns for f in folder.glob("*.safetensors")}


def test_cache(clips_dir, tiny_model_dir, tmp_path):
    import model
    import vae as vae_mod
    clips, out = data.scan(clips_dir), tmp_path / "cache"
    kw = dict(frames=5, fps=8, height=H, width=W, workers=0)
    cache_lib.build_cache(tiny_model_dir, clips_dir, out, limit=3, **kw)  # interrupted: 3 done
    first = _mtimes(out / "clips")
    assert len(first) == 3
    cache_lib.build_cache(tiny_model_dir, clips_dir, out, batch=2, **kw)  # resumes: 3 not redone
    done = _mtimes(out / "clips")
    assert len(done) == len(clips) and all(done[k] == v for k, v in first.items())
    cache = cache_lib.Cache(out)
    good = [c for c in clips if cache.has(c)]
    bad = sorted(os.path.basename(c.path) for c in clips if c not in good)
    assert bad == ["corrupt.mp4", "short.mp4"]
    assert "too short" in cache.why_missing(next(c for c in clips if c.path.endswith("short.mp4")))
    # cached posteriors = VAE.encode(read_video), within bf16 rounding
    vae = vae_mod.load_vae(tiny_model_dir / "vae")
    x = torch.stack([data.read_video(c.path, 5, 8, H, W) for c in good[:2]]).transpose(1, 2)
    mean, logvar = vae.encode(x)
    for c, m, lv in zip(good, mean, logvar):
        cm, clv = cache.latents(c)["mean"], cache.latents(c)["logvar"]
        assert cm.dtype == torch.bfloat16 and cm.shape == m.shape == (4, 2, H // 8, W // 8)
        assert (cm.float() - m).abs().max() <= 1e-2 * m.abs().max()  # bf16 storage
        assert (clv.float() - lv).abs().max() <= 1e-2 * lv.abs().max()
    tok = model.Tokenizer(tiny_model_dir / "tokenizer")
    t5 = model.load_t5(tiny_model_dir / "text_encoder")
    ref = t5(tok([good[0].caption]))[0]
    assert cache.text(good[0].caption).shape == ref.shape == (226, 32)
    assert (cache.text(good[0].caption).float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert sorted(v["caption"] for v in cache.texts.values()) == sorted({c.caption for c in clips})
    # the dataset serves cached posteriors and text, and skips clips that are bad in the cache
    ds = data.VideoPairs(clips, frames=5, fps=8, height=H, width=W, cache=cache, run_dir=tmp_path)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=data.collate)
    batches = [b for b in loader if b is not None]
    b = batches[0]
    assert b["video"]["mean"].shape[1:] == (4, 2, H // 8, W // 8) == b["ref"]["logvar"].shape[1:]
    assert b["text"].shape == (len(b["caption"]), 226, 32) and b["text"].dtype == torch.bfloat16
    served = [(i, j) for b in batches for i, j in zip(b["index"].tolist(), b["ref_index"].tolist())]
    assert served and all(cache.has(clips[i]) and cache.has(clips[j]) for i, j in served)
    i = b["index"][0].item()  # the cached first frame (image condition) is read_video's, bit-equal
    assert torch.equal(b["first"][0], data.read_video(clips[i].path, 5, 8, H, W)[0])
    assert sorted(os.path.basename(p) for p in ds.bad_clips()) == ["corrupt.mp4", "short.mp4"]
    # a rewritten clip is stale until re-encoded, and only it is re-encoded
    old = cache.latents(good[0])["mean"]
    data.write_video(good[0].path, ramp(20, offset=100), fps=8)
    stale = cache_lib.Cache(out)
    assert not stale.has(good[0]) and "changed" in stale.why_missing(good[0])
    cache_lib.build_cache(tiny_model_dir, clips_dir, out, **kw)
    again = _mtimes(out / "clips")
    redone = [k for k in done if again[k] != done[k]]
    assert redone == [cache_lib._key(good[0].path) + ".safetensors"]
    cache = cache_lib.Cache(out)
    assert cache.has(good[0]) and not torch.equal(cache.latents(good[0])["mean"], old)
    # different preprocessing settings re-encode everything
    cache_lib.build_cache(tiny_model_dir, clips_dir, out, limit=1, **{**kw, "width": 64})
    assert cache_lib.Cache(out).settings["width"] == 64 and len(cache_lib.Cache(out).clips) == 1
    with pytest.raises(ValueError, match="was built with"):
        data.VideoPairs(clips, frames=9, fps=8, height=H, width=W, cache=cache_lib.Cache(out))



def test_cache_cli_defaults_and_failure(clips_dir, tiny_model_dir, tmp_path, capsys):
    """frames/size come from the model as in train.py (tiny: 9 frames, 64x96; the old defaults, 49
    frames at 480x720, found every clip too short and exited 0); nothing usable cached: status 2."""
    argv = ["--model", str(tiny_model_dir), "--data", str(clips_dir), "--workers", "0"]
    assert cache_lib.main(argv + ["--out", str(tmp_path / "a")]) == 0
    c = cache_lib.Cache(tmp_path / "a")
    settings = {k: c.settings[k] for k in ("frames", "height", "width", "fps")}
    assert settings == dict(frames=9, height=H, width=W, fps=8)
    assert "6 clips, 2 bad, of 8" in capsys.readouterr().out
    assert cache_lib.main(argv + ["--out", str(tmp_path / "b"), "--frames", "49"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no usable clip was cached"), err


def test_cache_refuses_another_model(clips_dir, tiny_model_dir, tmp_path):
    """The cache records its VAE's and text encoder's configs and weight fingerprints; a model that
    differs in either is refused with a message saying which, though frames and size match."""
    import shutil
    from safetensors.torch import load_file, save_file
    out = tmp_path / "cache"
    cache_lib.build_cache(tiny_model_dir, clips_dir, out, limit=1, workers=0)
    c = cache_lib.Cache(out)
    c.check(tiny_model_dir)
    whats = (("vae", "another VAE than"), ("text_encoder", "another text encoder/tokenizer"))
    for sub, what in whats:
        other = tmp_path / sub / "model"
        shutil.copytree(tiny_model_dir, other)
        f = next((other / sub).glob("*.safetensors"))
        sd = load_file(str(f))
        k = sorted(sd)[0]
        sd[k] = sd[k] + 1e-3  # a retrained model: same shapes, other numbers
        save_file(sd, str(f), {"format": "pt"})
        with pytest.raises(ValueError, match=what):
            c.check(other)
    index = json.loads((out / "index.json").read_text())
    del index["settings"]["vae"]  # a cache from before the model was recorded
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="did not record the model"):
        cache_lib.Cache(out).check(tiny_model_dir)
