"""Train Video2LoRA (hypernetwork + LightLoRA auxiliary factors) on a frozen CogVideoX image-to-video model.

    python train.py --model CogVideoX-5b-I2V --data clips/ --out runs/v2l        # CPU or one GPU
    torchrun --nproc_per_node 8 train.py --model ... --data ... [--cache cache/] --out runs/v2l
    torchrun ... (same arguments) --resume   # continue exactly from the newest RUN/ckpt-*.safetensors
    python sample.py ref.mp4 img.png --model ... --ckpt runs/v2l/ckpt-020000.safetensors

The objective (diffusion.py) is the official CogVideoX I2V training's: v-prediction MSE at t ~ U{0..999};
the reference's latents go through Video2LoRA to a per-sample LoRA given to DiT.forward. Every random draw
of a sample comes from a generator seeded by (seed, global sample number), so 1 process x batch 2 == 2
processes x batch 1, and --resume is exact by construction.
"""
import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext, suppress
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from tqdm import tqdm

import cache as cache_lib
import common
import data
import linear
import hypernet
import model
import offload
import sample
import vae as vae_lib
from diffusion import alphas_cumprod, batch_fn

p = common.Parser(description=__doc__, formatter_class=common.HelpFormatter)
num = common.number
p.add_argument("--model", required=True, metavar="DIR",
               help="CogVideoX I2V folder (transformer/ vae/ text_encoder/ tokenizer/ scheduler/), e.g. assets")
p.add_argument("--data", required=True, help="folder root/<category>/<clip>.<ext> (+ <clip>.txt caption) or a "
               ".csv/.jsonl manifest (video, caption, category)")
p.add_argument("--cache", metavar="DIR", help="folder built by `python cache.py` from this --model with the same "
               "frames/fps/size (default: no cache, the VAE and T5 encode every step)")
p.add_argument("--out", required=True, metavar="DIR",
               help="run folder: ckpt-*.safetensors, metrics.jsonl, bad_clips.txt, samples/")
p.add_argument("--steps", type=num(int, 1), default=20000, help="total optimizer steps (the paper: ~20K on 8 GPUs)")
p.add_argument("--batch-size", type=num(int, 1), default=1, help="clips per process and step")
p.add_argument("--lr", type=num(float, 0), default=1e-4,
               help="peak learning rate (the paper's; the authors' code ran 1e-5)")
p.add_argument("--warmup", type=num(int, 0), default=100, help="linear warmup steps")
p.add_argument("--trunk-lr-scale", type=num(float, 0), default=0.1,
               help="the hypernet trunk's lr as a fraction of --lr (its heads and the aux factors take --lr): at the "
                    "full lr the trunk learned to ignore the reference, one LoRA for every video (bench/RESULTS.md)")
p.add_argument("--cosine", action="store_true", help="cosine decay to 0 after warmup (default: constant)")
p.add_argument("--weight-decay", type=num(float, 0), default=0.03, help="AdamW weight decay (as the authors' code)")
p.add_argument("--grad-clip", type=num(float, 1e-12), default=1.0,
               help="max global grad norm over all trainable parameters")
p.add_argument("--frames", type=num(int, 1), help="frames per clip, 4k+1 (default: the model's sample_frames)")
p.add_argument("--height", type=num(int, 16), help="default: the model's sample_height x 8")
p.add_argument("--width", type=num(int, 16), help="default: the model's sample_width x 8")
p.add_argument("--fps", type=num(float, 1e-3), default=8, help="frames read per second of video (longer clips: the "
               "first frames/fps seconds)")
p.add_argument("--hypernet", default="default", metavar="{%s}" % ",".join(sorted(hypernet.presets)),
               help="hypernet.py preset: default (the paper's size, for the real model), toy (the toy model in "
                    "assets/), tiny (tests)")
p.add_argument("--k", type=num(int, 1), help="refinement passes (default: the preset's)")
p.add_argument("--a", type=num(int, 1), default=100, help="LightLoRA input-side aux rank (A_aux [a, d_in])")
p.add_argument("--b", type=num(int, 1), default=50, help="LightLoRA output-side aux rank (B_aux [d_out, b])")
p.add_argument("--r", type=num(int, 1), default=1, help="rank of the predicted LoRA per video")
p.add_argument("--layers", choices=("attn", "all"), default="attn",
               help="adapted DiT linears: attention q/k/v/out, or every linear of the blocks")
p.add_argument("--caption-dropout", type=num(float, 0, 1), default=0.1,
               help="probability of the empty prompt's T5 embedding")
p.add_argument("--log-every", type=num(int, 1), default=10, help="a log line every N steps (and at the first and "
               "last; metrics.jsonl has every step)")
p.add_argument("--save-every", type=num(int, 1), default=400, help="checkpoint every N steps (and at the end)")
p.add_argument("--keep", type=num(int, 1), default=3, help="keep the newest K checkpoints")
p.add_argument("--eval-every", type=num(int, 0), default=0, help="sample validation videos every N steps (0: never)")
p.add_argument("--eval-data", help="held-out clips for validation (default: the first training clips)")
p.add_argument("--eval-n", type=num(int, 1), default=2, help="validation videos per evaluation")
p.add_argument("--eval-steps", type=num(int, 1, 1000), default=20, help="denoising steps of a validation video")
p.add_argument("--seed", type=num(int, 0, 2 ** 40), default=0,
               help="init, data order, pairing and every per-sample draw")
p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out "
               "(the model flags stored in it win over those given now)")
p.add_argument("--fsdp", action="store_true", help="shard the frozen DiT per block with FSDP2 (needs torchrun)")
p.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
               help="recompute each DiT and hypernetwork block's activations in backward (at 5B a step needs ~3x "
                    "the memory without)")
p.add_argument("--offload-activations", action="store_true", help="with --checkpointing: each DiT block's input "
               "waits in host memory until its recompute (-4.3 GiB at 5B-I2V; 2 x 4.6 GB over PCIe per step)")
p.add_argument("--compile", action="store_true", help="torch.compile each DiT block")
p.add_argument("--fp8-storage", action="store_true", help="keep the frozen DiT blocks' weight matrices in float8 "
               "(e4m3 x 2^k, 3 mantissa bits) and cast each to --dtype just before use: ~5 GiB less at 5B (linear.py)")
p.add_argument("--num-workers", type=num(int, 0), default=2, help="video decoding processes per rank")
p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if there is one; under torchrun the rank's GPU)")
# bf16 is what the 5B models were trained in; on CPU bf16 matmuls are slow and fp32 keeps tests tight.
p.add_argument("--dtype", choices=("bf16", "fp32"), help="frozen models (default: bf16 on cuda, fp32 on cpu)")
p.add_argument("--max-bad-steps", type=num(int, 1), default=20, help="stop after this many non-finite steps in a row")
p.add_argument("--debug-raise-at", default="", help="test hook: STEP[:RANK], that step raises (on that rank)")

RANK, WORLD, LOCAL = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
STOP = []  # signals received while training; acted on at the end of the current step
PHASE = ["set-up"]  # "train" once the loop runs: an error before it is the user's (one line, exit 2)


def print0(*a):
    if RANK == 0:
        tqdm.write(" ".join(map(str, a)))


def on_signal(signum, frame):
    """In the loop: save after this step, exit 128+signum. In set-up or at a second signal: stop at once."""
    name = signal.Signals(signum).name
    if PHASE[0] == "set-up" or STOP:
        print0(f"{name}: stopping now, nothing saved" + (" during set-up" if PHASE[0] == "set-up" else ""))
        raise SystemExit(128 + signum)
    print0(f"{name}: saving a checkpoint after this step, then exiting (send it again to stop at once)")
    STOP.append(signum)


def own_process_group(worker_id):
    """DataLoader workers leave the rank's process group, which torchrun's SIGTERM (and Ctrl-C) reaches: only
    the rank acts on it (finish the step, save). With default handlers they exit when the rank dies."""
    os.setpgrp()


def resumed(path, meta, args, run):
    """The resume line (flags that differ from the checkpoint's: its model flags win, the others are taken as
    given now); drops metrics.jsonl lines logged after that checkpoint."""
    arch, flag = ("hypernet", "k", "a", "b", "r", "layers"), lambda k: "--" + k.replace("_", "-")
    changed = [(k, v, getattr(args, k, v)) for k, v in meta["args"].items() if k not in ("steps", "resume", "out")]
    kept = [f"{flag(k)} {v} (given {now})" for k, v, now in changed if now != v and k in arch]
    new = [f"{flag(k)} {v} -> {now}" for k, v, now in changed if now != v and k not in arch]
    line = f"resumed from {path} at step {meta['step']} (sample {meta['samples']})"
    line += f"; the checkpoint's model is kept: {', '.join(kept)}" if kept else ""
    print0(line + (f"; changed from the checkpoint's: {', '.join(new)}" if new else ""))
    metrics = run / "metrics.jsonl"
    if RANK == 0 and metrics.is_file():
        lines = metrics.read_text().splitlines()
        metrics.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= meta["step"]))


def lr_at(step, args):
    warm = min(1.0, step / max(1, args.warmup))
    if not args.cosine or step <= args.warmup:
        return args.lr * warm
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - args.warmup) / max(1, args.steps - args.warmup)))


def is_trunk(name):
    return name.startswith("hypernet.") and not name.startswith("hypernet.head_")


def param_names(v2l):
    """Optimizer order: the hypernet's heads and the aux factors at --lr, then its trunk at --trunk-lr-scale x lr."""
    return sorted((n for n, _ in v2l.named_parameters()), key=is_trunk)  # stable: module order within each


def optimizer(v2l, names, args):
    params = dict(v2l.named_parameters())
    groups = [dict(params=[params[n] for n in names if not is_trunk(n)], lr_scale=1.0),
              dict(params=[params[n] for n in names if is_trunk(n)], lr_scale=args.trunk_lr_scale)]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)


def wrap(dit, args, dtype, v2l=None):
    """Activation checkpointing / torch.compile / FSDP2 per DiT block, in place. Checkpointing covers the
    hypernetwork's blocks too: over 17.5 K reference tokens x 16 block passes they hold ~5 GiB at 5B."""
    for blk in dit.transformer_blocks:
        if args.checkpointing:  # an instance-level forward keeps module names (and the lora keys) unchanged
            blk.forward = functools.partial(offload.checkpoint, blk.forward, on_host=args.offload_activations)
        if args.compile:
            blk.compile()
    if v2l is not None and args.checkpointing:  # the hypernet's blocks and the whole Video2LoRA call around them
        # (nested): its saved block inputs (0.5 GiB at 5B) are dropped until the fold's backward, after the DiT's
        for m in [*v2l.hypernet.blocks, v2l]:
            m.forward = functools.partial(torch.utils.checkpoint.checkpoint, m.forward, use_reentrant=False)
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for blk in dit.transformer_blocks:
            fully_shard(blk, mp_policy=mp)
        fully_shard(dit, mp_policy=mp)


def step_loss(net, dit, batch, amp):
    """The loss of one batch from batch_inputs. Autocast covers the fp32 hypernet only: the frozen DiT already
    runs in the compute dtype, and under CUDA's autocast its LayerNorms would return fp32, so modulation, RoPE
    and each projection's input would run in fp32 (at 5B: +26 GiB without --checkpointing, bench/MEMORY.md)
    with numerics unlike sampling's. lora_linear casts the fp32 LoRA factors to the DiT's dtype."""
    x, text, t, ofs, ref, v = batch
    with amp:
        lora = net(ref)
    pred = dit(x, text, t, ofs=ofs, lora=lora)
    return F.mse_loss(pred.float(), v)


def check(args):
    """Every check that needs no weights, before anything is loaded or created. -> (device, (frames, h, w),
    training clips, validation clips, the opened cache or None)."""
    device = common.check_device(args.device)
    if device.type == "cuda" and device.index is None:  # under torchrun each rank takes its own GPU
        device = common.check_device(f"cuda:{LOCAL}")
    if args.fp8_storage and args.fsdp:  # FSDP2's param_dtype cast would hand lora_linear unscaled bf16 weights
        raise ValueError("--fp8-storage and --fsdp cannot be combined: pick one")
    if args.offload_activations and not args.checkpointing:
        raise ValueError("--offload-activations keeps checkpointed activations in host memory: drop --no-checkpointing")
    if args.fsdp and WORLD == 1:
        raise ValueError("--fsdp shards the DiT over processes: run under torchrun with more than one process")
    if args.hypernet not in hypernet.presets:
        raise ValueError(f"--hypernet {args.hypernet!r}: presets are {', '.join(sorted(hypernet.presets))}")
    mdir, run = Path(args.model), Path(args.out)
    common.check_model_dir(mdir)
    size, _ = common.model_size(mdir, args.frames, args.height, args.width, step=4)
    clips = data.scan(args.data)  # FileNotFoundError / ValueError naming the folder or manifest
    eval_clips = data.scan(args.eval_data) if args.eval_data else clips
    c = cache_lib.Cache(args.cache) if args.cache else None
    if c is not None:
        c.check(mdir)
        want = dict(frames=size[0], fps=args.fps, height=size[1], width=size[2])
        if (have := {k: c.settings.get(k) for k in want}) != want:
            raise ValueError(f"--cache {args.cache} was built for {have}, this run wants {want}: rebuild it (python "
                             f"cache.py --model {mdir} --data {args.data} --out DIR) or match its settings")
    common.check_out_dir(run, "--out")
    if (found := hypernet.checkpoints(run)) and not args.resume:
        raise FileExistsError(f"--out {run} holds {found[-1].name}: pass --resume to continue it, or a new --out")
    return device, size, clips, eval_clips, c


def run(args):
    """The training run (set-up, then the loop) -> exit status: 0, 1 (too many non-finite steps in a row) or
    128 + signal (stopped by a signal after saving)."""
    device, (frames, height, width), clips, eval_clips, cache = check(args)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if WORLD > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    print0(f"loading the frozen models from {args.model}")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    amp = torch.autocast(device.type, torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    run_dir, mdir = Path(args.out), Path(args.model)

    # ---- frozen models (bf16, eval, no grad) -------------------------------------------------------------
    dit = model.load_dit(mdir / "transformer", dtype, "cpu" if args.fsdp else device)  # FSDP moves the shards
    if args.fp8_storage:
        linear.store_fp8(dit)
    vae = vae_lib.load_vae(mdir / "vae", dtype, device)  # eval, requires_grad False
    sched_cfg = json.loads((mdir / "scheduler" / "scheduler_config.json").read_text())
    A = alphas_cumprod(sched_cfg).float().to(device)
    t5 = tok = None
    if cache is None or not cache.has_text("") or args.eval_every:
        tok, t5 = model.Tokenizer(mdir / "tokenizer"), model.load_t5(mdir / "text_encoder", dtype, device)
    memo = {}  # T5 output per distinct caption, kept on the CPU (4K captions x 226 x 4096 bf16 = 7 GB)

    def embed(caption):
        if cache is not None and cache.has_text(caption):
            return cache.text(caption)
        if caption not in memo:
            with torch.no_grad():
                memo[caption] = t5(tok([caption]).to(device))[0].cpu()
        return memo[caption]
    empty = embed("")  # caption dropout -> T5(""), diffusers' negative prompt (SAT used an all-zero context)
    if cache is None and not args.eval_every:  # every caption now, so T5 leaves the device before the DiT runs
        for caption in dict.fromkeys(c.caption for c in clips):
            embed(caption)
    if not args.eval_every:
        t5 = None  # T5-XXL is 9.5 GB in bf16; kept only for the validation videos' prompts

    # ---- trainable Video2LoRA (fp32 master weights) -------------------------------------------------------
    found = hypernet.load_latest(run_dir, dit, device, print0)
    if found is None:
        if args.resume:
            print0(f"--resume: no checkpoint in {run_dir} yet, starting from scratch")
        torch.manual_seed(args.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        hcfg = hypernet.presets[args.hypernet]
        hcfg = dataclasses.replace(hcfg, iters=args.k) if args.k else hcfg
        v2l = hypernet.Video2LoRA(dit, hcfg, a=args.a, b=args.b, r=args.r, layers=args.layers).to(device)
    else:
        v2l = found[0]
    v2l = v2l.float().train()
    names = param_names(v2l)
    print0(f"Video2LoRA: {sum(p.numel() for p in v2l.parameters()) / 1e6:.2f} M trainable parameters, "
           f"{v2l.lora.n_layers} adapted layers; frozen DiT "
           f"{sum(p.numel() for p in dit.parameters()) / 1e9:.2f} B parameters in {dtype}")

    # ---- wrap: activation checkpointing, FSDP2 for the frozen DiT, DDP for the trainable part ----------------
    wrap(dit, args, dtype, v2l)
    net = v2l
    if WORLD > 1:  # one module: hypernet and aux factors are averaged together (the authors' aux were not)
        net = torch.nn.parallel.DistributedDataParallel(  # its buffers are constant indices: no broadcast
            v2l, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    opt = optimizer(v2l, names, args)
    step, samples, skipped = 0, 0, 0
    if found is not None:
        _, meta, path = found
        step, samples, skipped = meta["step"], meta["samples"], meta["skipped"]
        hypernet.load_optimizer(path, v2l, opt, device)
        resumed(path, meta, args, run_dir)

    # ---- data ---------------------------------------------------------------------------------------------
    run_dir.mkdir(parents=True, exist_ok=True)  # the first thing written: every check above has passed
    pairs = data.VideoPairs(clips, frames, args.fps, height, width, args.seed, cache, run_dir)
    loader = iter(torch.utils.data.DataLoader(
        data.Stream(pairs, args.seed), batch_size=args.batch_size,
        sampler=data.sample_numbers(samples, args.batch_size, RANK, WORLD),
        collate_fn=list, num_workers=args.num_workers, worker_init_fn=own_process_group))
    print0(f"data: {len(pairs)} clips, {frames} frames {height}x{width} at {args.fps:g} fps; world {WORLD} x "
           f"batch {args.batch_size}; {'cache ' + args.cache if cache else 'no cache: VAE/T5 encode each step'}")
    batch_inputs = batch_fn(args, vae, dit.config, A, cache, embed, empty, device, dtype)

    def save():
        if RANK == 0:
            path = run_dir / f"ckpt-{step:06d}.safetensors"
            info = dict(step=step, samples=samples, epoch=samples // len(pairs), index=samples % len(pairs),
                        skipped=skipped, args=vars(args))
            hypernet.save(path, v2l, opt, info)  # atomic
            for old in hypernet.checkpoints(run_dir)[:-max(1, args.keep)]:
                old.unlink()
            print0(f"saved {path}")

    # ---- loop -----------------------------------------------------------------------------------------------
    metrics = open(run_dir / "metrics.jsonl", "a") if RANK == 0 else None
    bar = tqdm(total=args.steps, initial=step, disable=RANK != 0, dynamic_ncols=True, desc="train")
    bad_in_row, stop, t_start = 0, None, time.perf_counter()
    raise_at = tuple(map(int, args.debug_raise_at.split(":"))) if args.debug_raise_at else ()
    PHASE[0] = "train"  # from here a signal saves first, and an error is a crash (traceback, exit 1)
    while step < args.steps and not stop:
        t0 = time.perf_counter()
        step += 1
        loss = step_loss(net, dit, batch_inputs(next(loader)), amp)
        if raise_at[:1] == (step,) and raise_at[1:] in ((), (RANK,)):
            raise RuntimeError(f"--debug-raise-at {args.debug_raise_at}: step {step} fails on rank {RANK}")
        loss.backward()
        stats = torch.tensor([loss.item(), signal.SIGINT in STOP, signal.SIGTERM in STOP],
                             dtype=torch.float64, device=device)
        if WORLD > 1:  # average the loss; a signal that reached some ranks, or arrived between two
            dist.all_reduce(stats)  # ranks' reads of STOP, stops all of them at the same step
        loss_avg = stats[0].item() / WORLD
        stop = signal.SIGTERM if stats[2] > 0 else signal.SIGINT if stats[1] > 0 else None
        gnorm = torch.nn.utils.clip_grad_norm_(v2l.parameters(), args.grad_clip)
        lr = lr_at(step, args)
        if math.isfinite(loss_avg) and torch.isfinite(gnorm):
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            opt.step()
            bad_in_row = 0
        else:
            skipped += 1
            bad_in_row += 1
            print0(f"step {step}: non-finite loss/gradient ({loss_avg}, grad norm {gnorm.item()}), step skipped")
        opt.zero_grad(set_to_none=True)
        samples += WORLD * args.batch_size
        dt = time.perf_counter() - t0
        mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
        rec = dict(step=step, loss=loss_avg, lr=lr, s_per_step=dt, videos_per_s=WORLD * args.batch_size / dt,
                   mem_gb=mem, grad_norm=gnorm.item(), skipped=skipped)
        if RANK == 0:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
        if step % args.log_every == 0 or step in (1, args.steps) or stop:
            print0(f"step {step} | loss {loss_avg:.4f} | lr {lr:.2e} | {dt:.2f} s/step | "
                   f"{rec['videos_per_s']:.2f} videos/s | mem {mem:.1f} GB")
        if bad_in_row >= args.max_bad_steps:
            last = hypernet.checkpoints(run_dir)
            print0(f"stopping: {bad_in_row} non-finite steps in a row at step {step}; the last good checkpoint "
                   f"is {last[-1] if last else '(none yet)'} (lower --lr, check the data, or raise "
                   f"--max-bad-steps)")
            return 1
        if step % args.save_every == 0 or step == args.steps or stop:
            save()
        if args.eval_every and step % args.eval_every == 0:
            validate(args, step, run_dir, eval_clips, (frames, height, width), v2l, dict(
                dit=dit, vae=vae, t5=t5, tok=tok, sched_cfg=sched_cfg, device=device, dtype=dtype))
    bar.close()
    if metrics is not None:
        metrics.close()
    last, took = hypernet.checkpoints(run_dir), time.perf_counter() - t_start
    took = f"{took / 3600:.2f} h" if took > 3600 else f"{took:.0f} s"
    bad = run_dir / "bad_clips.txt"
    print0(f"{'stopped' if stop else 'done'}: step {step} of {args.steps} in {took} ({skipped} steps "
           f"skipped); last checkpoint {last[-1] if last else '(none)'}; metrics per step in "
           f"{run_dir / 'metrics.jsonl'}" + (f"; unusable clips in {bad}" if bad.is_file() else ""))
    if last and not stop:
        print0(f"sample with it: python sample.py REF.mp4 IMAGE.png --model {args.model} --ckpt {last[-1]}")
    if WORLD > 1:
        dist.barrier()
        dist.destroy_process_group()
    if stop:  # non-zero, so a scheduler can tell an interrupted run from a finished one
        print0(f"stopped by {stop.name} at step {step} of {args.steps}, after saving "
               f"{run_dir / f'ckpt-{step:06d}.safetensors'}; exit status {128 + stop} (--resume continues the run)")
        return 128 + stop
    return 0


def validate(args, step, run_dir, clips, size, v2l, frozen):
    """A few reference/image pairs sampled to RUN/samples/step-N-i.mp4 (reference | generated) through
    sample.py's pipeline on the loaded modules. Every rank runs it (an FSDP-sharded DiT needs all of them)."""
    vp = data.VideoPairs(clips, size[0], args.fps, size[1], size[2], args.seed)
    pipe = sample.Pipeline(v2l=v2l.eval(), **frozen)
    items = [vp[i] for i in range(min(len(vp), 4 * args.eval_n))]
    items = [it for it in items if it is not None][:args.eval_n]
    for i, it in enumerate(items):
        ref = (it["ref"] + 1) / 2
        video = pipe.generate((it["video"][0] + 1) / 2, it["caption"], ref=ref, steps=args.eval_steps, seed=i)
        if RANK == 0:
            (run_dir / "samples").mkdir(exist_ok=True)
            out = run_dir / "samples" / f"step-{step:06d}-{i}.mp4"
            data.write_video(out, torch.cat([ref, video], 3), args.fps)
    v2l.train()
    print0(f"validation: {len(items)} videos in {run_dir / 'samples'}")


def main(argv=None):
    """-> 0, or 2 for a mistake found in set-up (one line); a crash in the loop is a traceback and status 1.
    Callable in-process (tests): it resets the run state and puts the signal handlers back."""
    args = p.parse_args(argv)
    out = Path(args.out)
    made = not out.exists()
    STOP.clear()
    PHASE[0] = "set-up"
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}  # set-up: stop at once
    try:
        return run(args)
    except (OSError, ValueError, data.VideoError, SafetensorError) as e:
        if PHASE[0] != "set-up":
            raise
        return common.error_line(e)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if made and out.is_dir() and not any(out.iterdir()):
            with suppress(OSError):  # another rank may have removed it first
                out.rmdir()  # a run that failed before writing anything leaves nothing behind


if __name__ == "__main__":
    sys.exit(main())
